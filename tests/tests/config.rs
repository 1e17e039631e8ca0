//! The file source as editors, ConfigMaps and operators really treat it: truncated and
//! half-written files, directories replaced, symlinks re-pointed, unreadable files, two agents
//! on one pin directory, the attached cgroup removed.
use std::{fs, os::unix::fs::symlink, path::Path, process::Command};

use mesh_tests::*;

const VIP: &str = "10.96.0.10:80";

fn web(endpoints: Vec<Endpoint<'_>>) -> String {
    ServiceYaml::web(endpoints).render()
}

/// A second Service, `test/api` on 10.96.0.20:80.
fn api(address: &str) -> String {
    ServiceYaml { name: "api", cluster_ip: "10.96.0.20", ..ServiceYaml::web(vec![Endpoint::ready(address)]) }.render()
}

fn line_with(log: &str, needle: &str) -> bool {
    log.lines().any(|l| l.contains(needle))
}

#[test]
fn a_truncated_file_keeps_serving_its_services_until_it_has_content_or_is_deleted() {
    in_netns(|| {
        let _b1 = Backend::start("b1", &["127.0.0.11:8080"]);
        let cgroup = TestCgroup::new("truncated");
        let agent = Agent::start(AgentSpec::new(&web(vec![Endpoint::ready("127.0.0.11")]), &cgroup));
        let file = agent.config_dir.join("services.yaml");
        // `: > services.yaml`, as a shell or a careless writer does.
        fs::File::create(&file).expect("truncate");
        wait_until(|| line_with(&agent.log(), "file is empty"), || agent.log());
        assert_eq!(agent.kernel_backends(VIP), Some(vec!["127.0.0.11:8080".to_owned()]));
        let (code, body) = agent.readiness();
        assert!(code == 200 && body.contains("ready: 1 services"), "{body}");
        assert_eq!(names(&cgroup.probe(&["tcp", VIP, "3"])), vec![("b1".to_owned(), 3)]);

        // Content again: applied. Deleted: its objects go.
        fs::write(&file, web(vec![Endpoint::ready("127.0.0.12")])).expect("write");
        agent.wait_backends(VIP, &["127.0.0.12:8080"]);
        fs::remove_file(&file).expect("delete");
        wait_until(|| agent.kernel_backends(VIP).is_none(), || format!("{}", agent.config_dump()));
        agent.stop();
    });
}

#[test]
fn a_half_written_file_removes_nothing_while_the_writer_is_still_at_it() {
    in_netns(|| {
        let cgroup = TestCgroup::new("half");
        let both = format!("{}\n---\n{}", web(vec![Endpoint::ready("127.0.0.11")]), api("127.0.0.21"));
        // Removals wait for 2 s of quiet: longer than this test takes between its writes even
        // under emulation.
        let agent = Agent::start(AgentSpec { extra_args: vec!["--removal-quiet-ms", "2000"], ..AgentSpec::new(&both, &cgroup) });
        agent.wait_backends("10.96.0.20:80", &["127.0.0.21:8080"]);
        let file = agent.config_dir.join("services.yaml");
        // A slow writer: the first document is there, the second not yet.
        let half = web(vec![Endpoint::ready("127.0.0.11")]);
        fs::write(&file, &half).expect("first half");
        wait_until(|| line_with(&agent.log(), "applying once it stays the same"), || agent.log());
        assert!(agent.kernel_backends("10.96.0.20:80").is_some(), "api is still served while the file may be half written");
        // The writer finishes: the pending removal is called off, nothing was ever removed.
        fs::write(&file, &both).expect("rest");
        wait_until(|| line_with(&agent.log(), "back in the file"), || agent.log());
        assert!(agent.kernel_backends("10.96.0.20:80").is_some(), "{}", agent.log());
        let synced = agent.log();
        assert!(synced.lines().filter(|l| l.contains("kernel maps synced")).all(|l| l.contains("deletes=0")), "{synced}");

        // A removal that stays: applied once the file has been quiet.
        fs::write(&file, &half).expect("api removed for good");
        wait_until_for(std::time::Duration::from_secs(60), || agent.kernel_backends("10.96.0.20:80").is_none(), || agent.log());
        assert!(agent.kernel_backends(VIP).is_some());
        agent.stop();
    });
}

#[test]
fn a_config_directory_deleted_and_recreated_is_watched_again() {
    in_netns(|| {
        let cgroup = TestCgroup::new("recreated");
        let agent = Agent::start(AgentSpec::new(&web(vec![Endpoint::ready("127.0.0.11")]), &cgroup));
        fs::remove_dir_all(&agent.config_dir).expect("rm -r");
        wait_until(|| agent.kernel_backends(VIP).is_none(), || agent.log());
        fs::create_dir(&agent.config_dir).expect("mkdir");
        agent.write_config(&web(vec![Endpoint::ready("127.0.0.12")]));
        agent.wait_backends(VIP, &["127.0.0.12:8080"]);
        // And the new directory is the one watched.
        agent.write_config(&web(vec![Endpoint::ready("127.0.0.13")]));
        agent.wait_backends(VIP, &["127.0.0.13:8080"]);
        agent.stop();
    });
}

#[test]
fn a_config_symlink_repointed_is_followed() {
    in_netns(|| {
        let cgroup = TestCgroup::new("symlink");
        let base = std::env::temp_dir().join(unique_name("symlinked"));
        let (v1, v2) = (base.join("v1"), base.join("v2"));
        fs::create_dir_all(&v1).expect("v1");
        fs::create_dir_all(&v2).expect("v2");
        fs::write(v1.join("web.yaml"), web(vec![Endpoint::ready("127.0.0.11")])).expect("v1 config");
        fs::write(v2.join("web.yaml"), web(vec![Endpoint::ready("127.0.0.12")])).expect("v2 config");
        let link = base.join("current");
        symlink(&v1, &link).expect("symlink");
        let agent = Agent::start(AgentSpec { config_path: Some(link.clone()), ..AgentSpec::new("", &cgroup) });
        agent.wait_backends(VIP, &["127.0.0.11:8080"]);
        // `ln -sfn v2 current`: a new link renamed over the old one.
        let tmp = base.join(".current.tmp");
        symlink(&v2, &tmp).expect("new link");
        fs::rename(&tmp, &link).expect("re-point");
        agent.wait_backends(VIP, &["127.0.0.12:8080"]);
        // Edits in the new target are seen.
        fs::write(v2.join("web.yaml"), web(vec![Endpoint::ready("127.0.0.13")])).expect("edit v2");
        agent.wait_backends(VIP, &["127.0.0.13:8080"]);
        agent.stop();
        let _ = fs::remove_dir_all(&base);
    });
}

#[test]
fn restoring_a_file_after_a_read_error_clears_the_rejection() {
    in_netns(|| {
        let cgroup = TestCgroup::new("unreadable");
        let good = web(vec![Endpoint::ready("127.0.0.11")]);
        let agent = Agent::start(AgentSpec::new(&good, &cgroup));
        // Not UTF-8: the file cannot be read as text.
        let file = agent.config_dir.join("services.yaml");
        let tmp = agent.config_dir.join(".bad.tmp");
        fs::write(&tmp, b"\xff\xfe not text").expect("bad bytes");
        fs::rename(&tmp, &file).expect("rename");
        wait_until(|| agent.readiness().1.contains("rejected"), || agent.readiness().1);
        assert!(agent.readiness().1.contains("services.yaml: cannot read"), "{}", agent.readiness().1);
        assert_eq!(agent.kernel_backends(VIP), Some(vec!["127.0.0.11:8080".to_owned()]));
        // The very same good content as before: nothing to apply, but the rejection is over.
        agent.write_config(&good);
        wait_until(|| !agent.readiness().1.contains("rejected"), || agent.readiness().1);
        agent.stop();
    });
}

#[test]
fn a_second_agent_on_the_same_pin_directory_fails_at_once_and_harms_nothing() {
    in_netns(|| {
        let _b1 = Backend::start("b1", &["127.0.0.11:8080"]);
        let cgroup = TestCgroup::new("two-agents");
        let yaml = web(vec![Endpoint::ready("127.0.0.11")]);
        let first = Agent::start(AgentSpec::new(&yaml, &cgroup));
        let out = Command::new(mesh_bin())
            .arg("agent")
            .arg("--config")
            .arg(&first.config_dir)
            .arg("--cgroup")
            .arg(&cgroup.path)
            .arg("--bpffs")
            .arg(&first.bpffs)
            .args(["--admin-addr", "127.0.0.1:16000", "--readiness-addr", "127.0.0.1:16021"])
            .args(["--metrics-addr", "127.0.0.1:16020", "--outbound-addr", "127.0.0.1:16001"])
            .output()
            .expect("second agent");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "a second agent on one pin directory must not start:\n{stderr}");
        assert!(stderr.contains("in use by another mesh agent"), "{stderr}");
        // The first one is untouched and keeps balancing.
        assert_eq!(first.readiness().0, 200);
        assert_eq!(names(&cgroup.probe(&["tcp", VIP, "3"])), vec![("b1".to_owned(), 3)]);
        assert!(Path::new(&first.bpffs).join("mesh_frontends").exists());
        first.stop();
    });
}

#[test]
fn removing_the_attached_cgroup_makes_the_agent_unready_and_says_why() {
    in_netns(|| {
        let cgroup = TestCgroup::new("removed");
        let agent = Agent::start(AgentSpec::new(&web(vec![Endpoint::ready("127.0.0.11")]), &cgroup));
        fs::remove_dir(&cgroup.path).expect("rmdir the cgroup");
        wait_until(|| agent.readiness().0 == 503, || agent.readiness().1);
        assert!(agent.readiness().1.contains("was removed"), "{}", agent.readiness().1);
        agent.stop();
        // TestCgroup's drop tolerates a cgroup that is already gone.
    });
}

/// Writes a ConfigMap volume's next version as kubelet's atomic writer does: a new timestamped
/// directory, `..data` swapped to it by rename, user-visible symlinks for new keys, the old
/// directory removed.
fn configmap_update(dir: &Path, version: u32, files: &[(&str, &str)]) {
    let stamped = dir.join(format!("..2026_12_03_{version}"));
    fs::create_dir(&stamped).expect("timestamped dir");
    for (name, text) in files {
        fs::write(stamped.join(name), text).expect("key");
    }
    let old = fs::read_link(dir.join("..data")).ok();
    let tmp = dir.join("..data_tmp");
    symlink(stamped.file_name().unwrap(), &tmp).expect("..data_tmp");
    fs::rename(&tmp, dir.join("..data")).expect("swap ..data");
    for (name, _) in files {
        let visible = dir.join(name);
        if !visible.exists() {
            symlink(Path::new("..data").join(name), &visible).expect("key link");
        }
    }
    if let Some(old) = old {
        fs::remove_dir_all(dir.join(old)).expect("old version");
    }
}

#[test]
fn a_configmap_volume_update_is_applied_new_keys_included() {
    in_netns(|| {
        let cgroup = TestCgroup::new("configmap");
        let dir = std::env::temp_dir().join(unique_name("configmap"));
        fs::create_dir_all(&dir).expect("volume");
        configmap_update(&dir, 1, &[("web.yaml", &web(vec![Endpoint::ready("127.0.0.11")]))]);
        let agent = Agent::start(AgentSpec { config_path: Some(dir.clone()), ..AgentSpec::new("", &cgroup) });
        agent.wait_backends(VIP, &["127.0.0.11:8080"]);
        configmap_update(&dir, 2, &[("web.yaml", &web(vec![Endpoint::ready("127.0.0.12")]))]);
        agent.wait_backends(VIP, &["127.0.0.12:8080"]);
        // A key added: a new symlink, after the swap.
        configmap_update(&dir, 3, &[("web.yaml", &web(vec![Endpoint::ready("127.0.0.12")])), ("api.yaml", &api("127.0.0.21"))]);
        agent.wait_backends("10.96.0.20:80", &["127.0.0.21:8080"]);
        agent.stop();
        let _ = fs::remove_dir_all(&dir);
    });
}

#[test]
fn an_idle_agent_does_not_read_its_configuration_again() {
    in_netns(|| {
        let cgroup = TestCgroup::new("idle-reads");
        let agent = Agent::start(AgentSpec::new(&web(vec![Endpoint::ready("127.0.0.11")]), &cgroup));
        let dir = &agent.config_dir;
        for i in 0..20 {
            fs::write(dir.join(format!("extra{i:02}.yaml")), "# nothing yet\n").expect("extra file");
        }
        // A ConfigMap-style swap makes the agent list and compare every file once.
        fs::create_dir(dir.join("..2026_12_03_1")).expect("dir");
        symlink("..2026_12_03_1", dir.join("..data")).expect("..data");
        agent.write_config(&web(vec![Endpoint::ready("127.0.0.12")]));
        agent.wait_backends(VIP, &["127.0.0.12:8080"]);
        let reads = || agent.metric("mesh_config_file_reads_total", &[]);
        let before = reads();
        // One more change, and the time it takes to apply, is all the agent reads: one file
        // (listing the directory must not make it read everything again, and again).
        agent.write_config(&web(vec![Endpoint::ready("127.0.0.13")]));
        agent.wait_backends(VIP, &["127.0.0.13:8080"]);
        let after = reads();
        assert!(after - before <= 2.0, "read {} files for one change of one file", after - before);
        agent.stop();
    });
}

#[test]
fn a_config_file_symlink_into_another_directory_follows_edits_of_its_target() {
    in_netns(|| {
        let cgroup = TestCgroup::new("file-link");
        let base = std::env::temp_dir().join(unique_name("file-link"));
        let (real_dir, link_dir) = (base.join("real"), base.join("etc"));
        fs::create_dir_all(&real_dir).expect("real dir");
        fs::create_dir_all(&link_dir).expect("link dir");
        let real = real_dir.join("services.yaml");
        fs::write(&real, web(vec![Endpoint::ready("127.0.0.11")])).expect("real file");
        let link = link_dir.join("services.yaml");
        symlink(&real, &link).expect("symlink");
        let agent = Agent::start(AgentSpec { config_path: Some(link.clone()), ..AgentSpec::new("", &cgroup) });
        agent.wait_backends(VIP, &["127.0.0.11:8080"]);
        // Edited where it lives, not through the link.
        fs::write(&real, web(vec![Endpoint::ready("127.0.0.12")])).expect("edit target");
        agent.wait_backends(VIP, &["127.0.0.12:8080"]);
        // Re-pointed to a file in a third directory, then that file edited.
        let other_dir = base.join("other");
        fs::create_dir_all(&other_dir).expect("other dir");
        let other = other_dir.join("web.yaml");
        fs::write(&other, web(vec![Endpoint::ready("127.0.0.13")])).expect("other file");
        let tmp = link_dir.join(".services.yaml.tmp");
        symlink(&other, &tmp).expect("new link");
        fs::rename(&tmp, &link).expect("re-point");
        agent.wait_backends(VIP, &["127.0.0.13:8080"]);
        fs::write(&other, web(vec![Endpoint::ready("127.0.0.14")])).expect("edit new target");
        agent.wait_backends(VIP, &["127.0.0.14:8080"]);
        agent.stop();
        let _ = fs::remove_dir_all(&base);
    });
}

#[test]
fn a_standalone_pod_names_its_cgroup_by_annotation() {
    in_netns(|| {
        let cgroup = TestCgroup::new("standalone-pod");
        let mount = cgroup2_root();
        let under_mount = Path::new("/").join(cgroup.path.strip_prefix(&mount).expect("under the cgroup2 mount"));
        // No nodeName: a standalone file describes this host.
        let pod = format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: cli\n  namespace: tools\n  uid: u-1\n  annotations: {{mesh.dev/cgroup: \"{}\"}}\n\
             spec: {{serviceAccountName: ops, containers: []}}\nstatus: {{podIPs: [{{ip: 10.1.0.9}}]}}\n---\n{}",
            under_mount.display(),
            web(vec![Endpoint::ready("127.0.0.11")])
        );
        let agent = Agent::start(AgentSpec::new(&pod, &cgroup));
        let rows = agent.config_dump()["workloads"].clone();
        assert_eq!(rows[0]["pod"], "tools/cli", "{rows}");
        assert_eq!(rows[0]["principal"], "spiffe://cluster.local/ns/tools/sa/ops", "{rows}");
        let inode = std::os::unix::fs::MetadataExt::ino(&fs::metadata(&cgroup.path).unwrap());
        assert_eq!(rows[0]["cgroup_id"], inode, "{rows}");
        // A relative path is refused, naming the field.
        agent.write_config(&pod.replace(&under_mount.display().to_string(), "relative/path"));
        wait_until(|| agent.readiness().1.contains("mesh.dev/cgroup"), || agent.readiness().1);
        agent.stop();
    });
}
