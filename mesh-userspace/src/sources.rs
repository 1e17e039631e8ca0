//! Where configuration comes from. `file`: multi-document YAML files or a directory of them,
//! watched for changes. (A Kubernetes API source will feed the same `Catalog`.)
pub mod file;
