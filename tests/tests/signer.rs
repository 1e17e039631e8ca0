//! The central signer (`mesh ca serve`) against the API server double: it signs an identity
//! only for an agent's token bound to a node where a pod of that identity runs, and an agent
//! gets its workloads' certificates from it.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use mesh_tests::{kube_api::KubeApi, *};

const SIGNER: &str = "127.0.0.1:15012";

/// Asks the signer for `identity` with `token` (Python's urllib and ssl: nothing of mesh's);
/// the JSON answer with its HTTP status.
const CLIENT: &str = r#"
import base64, json, ssl, sys, urllib.error, urllib.request
url, root, token, identity, csr = sys.argv[1:6]
ctx = ssl.create_default_context(cafile=root)
ctx.check_hostname = False  # a SPIFFE certificate names no host
body = json.dumps({"identity": identity, "csr": base64.b64encode(open(csr, "rb").read()).decode(), "lifetime_seconds": 3600}).encode()
request = urllib.request.Request(url, data=body, headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
try:
    with urllib.request.urlopen(request, context=ctx, timeout=20) as r:
        status, text = r.status, r.read()
except urllib.error.HTTPError as e:
    status, text = e.code, e.read()
answer = json.loads(text)
answer["status"] = status
print(json.dumps(answer))
"#;

struct Signer {
    child: Child,
    log: PathBuf,
}

impl Signer {
    fn start(ca: &Path, api: &KubeApi) -> Self {
        let log = ca.join("signer.log");
        let child = Command::new(mesh_bin())
            .args(["ca", "serve", "--ca-dir"])
            .arg(ca)
            .args(["--listen", SIGNER, "--kubeconfig"])
            .arg(&api.kubeconfig)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("mesh ca serve");
        let signer = Self { child, log };
        wait_until(|| std::net::TcpStream::connect(SIGNER).is_ok(), || signer.log());
        signer
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Signer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn setup(api: &KubeApi) -> PathBuf {
    api.apply(serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop", "labels": {"mesh.dev/dataplane": "enabled"}}}));
    for (name, node, account) in [("web-0", "node-a", "web"), ("db-0", "node-b", "db")] {
        api.apply(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}")},
            "spec": {"nodeName": node, "serviceAccountName": account, "containers": [{"name": "app", "image": "x"}]},
            "status": {"phase": "Running", "podIP": if node == "node-a" { "10.244.0.5" } else { "10.244.1.5" }, "hostIP": "192.168.0.1", "qosClass": "BestEffort"}
        }));
    }
    api.add_token("agent-a", "system:serviceaccount:mesh-system:mesh", Some("node-a"));
    api.add_token("agent-b", "system:serviceaccount:mesh-system:mesh", Some("node-b"));
    api.add_token("unbound", "system:serviceaccount:mesh-system:mesh", None);
    api.add_token("app", "system:serviceaccount:shop:web", Some("node-a"));
    let ca = std::env::temp_dir().join(unique_name("signer-ca"));
    run(Command::new(mesh_bin()).args(["ca", "init"]).arg(&ca));
    ca
}

#[test]
fn the_signer_signs_only_identities_of_pods_on_the_asking_agents_node() {
    in_netns(|| {
        let api = KubeApi::start(&["apis/gateway.networking.k8s.io/v1/httproutes", "apis/gateway.networking.k8s.io/v1/grpcroutes"]);
        let ca = setup(&api);
        let signer = Signer::start(&ca, &api);
        let csr = ca.join("req.der");
        run(Command::new("openssl")
            .args(["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", "/O=asks for anything"])
            .arg("-keyout")
            .arg(ca.join("req.key"))
            .args(["-outform", "DER", "-out"])
            .arg(&csr));
        let root = ca.join("root-cert.pem");
        let ask = |token: &str, identity: &str| -> Value {
            parse_probe(
                Command::new("python3")
                    .args(["-c", CLIENT, &format!("https://{SIGNER}/v1/sign")])
                    .arg(&root)
                    .args([token, identity])
                    .arg(&csr),
            )
        };
        let web = "spiffe://cluster.local/ns/shop/sa/web";

        // The agent of web's node: signed, for web only (whatever the request asked).
        let answer = ask("agent-a", web);
        assert_eq!(answer["status"], 200, "{answer}\n{}", signer.log());
        let leaf = ca.join("leaf.der");
        std::fs::write(&leaf, base64_decode(answer["chain"][0].as_str().expect("chain"))).expect("leaf");
        let san = run(Command::new("openssl").args(["x509", "-inform", "DER", "-noout", "-ext", "subjectAltName", "-in"]).arg(&leaf));
        assert!(san.contains(&format!("URI:{web}")) && !san.contains("DNS"), "{san}");

        // Another node's agent, a token bound to no node, a workload's own token, no token
        // known at all, another trust domain: refused, each saying why.
        for (token, identity, status, why) in [
            ("agent-b", web, 403, "runs on node node-b"),
            ("unbound", web, 403, "bound to no node"),
            ("app", web, 403, "not an agent's service account"),
            ("forged", web, 401, "invalid bearer token"),
            ("agent-a", "spiffe://elsewhere/ns/shop/sa/web", 403, "not in trust domain"),
        ] {
            let answer = ask(token, identity);
            assert_eq!(answer["status"], status, "{token}: {answer}");
            assert!(answer["error"].as_str().is_some_and(|e| e.contains(why)), "{token}: {answer}");
        }
        assert!(signer.log().contains("certificate request refused"), "{}", signer.log());
        let _ = std::fs::remove_dir_all(&ca);
    });
}

#[test]
fn an_agent_gets_its_workloads_certificates_from_the_signer() {
    in_netns(|| {
        let api = KubeApi::start(&["apis/gateway.networking.k8s.io/v1/httproutes", "apis/gateway.networking.k8s.io/v1/grpcroutes"]);
        let ca = setup(&api);
        let signer = Signer::start(&ca, &api);
        let token = ca.join("token");
        std::fs::write(&token, "agent-a\n").expect("token");
        let cgroup = TestCgroup::new("signer-agent");
        let mut spec = AgentSpec::new("", &cgroup);
        spec.kubeconfig = Some(api.kubeconfig.clone());
        let (root, token) = (ca.join("root-cert.pem").display().to_string(), token.display().to_string());
        spec.extra_args = vec!["--ca-addr", SIGNER, "--ca-root", &root, "--ca-token-file", &token];
        let agent = Agent::start(spec);
        // A TLS client asking the agent's HBONE port for web's certificate: the agent mints it
        // on demand, through the signer.
        let hello = || {
            let _ = Command::new("openssl")
                .args(["s_client", "-connect", "127.0.0.1:15008", "-servername", "web.shop.sa.mesh.internal", "-tls1_3"])
                .stdin(Stdio::null())
                .output();
        };
        hello();
        let certificates = || agent.config_dump()["certificates"].clone();
        wait_until(
            || {
                hello();
                certificates()[0]["identity"] == "spiffe://cluster.local/ns/shop/sa/web"
            },
            || format!("{}\nagent:\n{}\nsigner:\n{}", certificates(), agent.log(), signer.log()),
        );
        assert!(signer.log().contains("node-a"), "signed for node-a's agent:\n{}", signer.log());
        agent.stop();
        let _ = std::fs::remove_dir_all(&ca);
    });
}

fn base64_decode(text: &str) -> Vec<u8> {
    let out = Command::new("python3")
        .args(["-c", "import base64,sys; sys.stdout.buffer.write(base64.b64decode(sys.argv[1]))", text])
        .output()
        .expect("python3");
    assert!(out.status.success());
    out.stdout
}
