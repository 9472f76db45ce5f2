//! Confinement to what was granted and uploaded, through a real `telvirt serve` and the CLI
//! (issue #12): a descriptor's module is uploaded from beside the descriptor and scoped to its
//! uploader; a file that is not wasm is refused without its content ever being echoed; a VNF's
//! memory budget is placed against the host's memory minus `--memory-reserve`; a host path a
//! non-admin names must be granted, and a grant in use cannot be revoked.

use std::path::Path;
use std::time::Instant;

use serde_json::Value;

mod common;
use common::{DEADLINE, Serve, stderr, stdout};

/// A node on the 2-CPU inventory `examples/inventory/dev2.yaml` (host `dev`, both CPUs
/// dedicatable), in a directory laid out with the examples.
fn dev2(extra: &[&str]) -> Serve {
    let mut args = vec!["--inventory", "examples/inventory/dev2.yaml"];
    args.extend_from_slice(extra);
    Serve::with_examples(&args)
}

/// A firewall VNF descriptor running `module` with `cpu` and `limits`.
fn firewall(name: &str, module: &str, cpu: &str, limits: &str) -> String {
    format!(
        "apiVersion: telvirt/v1\nkind: Vnf\nmetadata: {{ name: {name} }}\nspec:\n  runtime: wasm\n  cpu: {cpu}\n  ports: [in, out]\n  wasm:\n    module: {module}\n    limits: {limits}\n    config: {{ blob_hex: \"02000000\" }}\n"
    )
}

/// What `telvirt wasm verify -o json FILE` says (exit status checked by the caller).
fn verify(node: &Serve, file: &Path) -> (bool, String, String) {
    let out = node.cli(&["wasm", "verify", file.to_str().unwrap(), "-o", "json"]);
    (out.status.success(), stdout(&out), stderr(&out))
}

/// Polls `vnf show` until the scheduler has decided: placed, or Pending with its reason.
fn decided(node: &Serve, name: &str) -> Value {
    node.wait_vnf(name, |v| {
        v["phase"] != "Pending"
            || v["reason"]
                .as_str()
                .is_some_and(|r| r.contains("cannot place"))
    })
}

#[test]
fn a_descriptors_module_is_uploaded_from_beside_it_and_scoped_to_its_uploader() {
    let node = dev2(&[]);
    let ent1 = node.authority("ent1");
    let ent2 = node.authority("ent2");

    // The descriptor and its module in sub/dir of a working directory that is not serve's;
    // a file of the same name in the working directory itself is not a module at all, so only
    // the right resolution (against the descriptor's directory) can succeed.
    let work = Serve::dir();
    let sub = work.path().join("sub/dir");
    std::fs::create_dir_all(&sub).unwrap();
    std::fs::copy(
        node.path("examples/vnfs/firewall.wasm"),
        sub.join("firewall.wasm"),
    )
    .unwrap();
    std::fs::write(work.path().join("firewall.wasm"), "not the module\n").unwrap();
    std::fs::write(
        sub.join("fw.yaml"),
        firewall(
            "fw",
            "firewall.wasm",
            "{ policy: dedicated, count: 1 }",
            "{ memory: 16MiB }",
        ),
    )
    .unwrap();
    let out = node.cli_at(
        work.path(),
        Some(&ent1),
        &["vnf", "create", "-f", "sub/dir/fw.yaml"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let fw = node.wait_vnf("fw", |v| v["phase"] == "Running" || v["phase"] == "Failed");
    assert_eq!(fw["phase"], "Running", "{fw}");
    assert_eq!(fw["owner"], "ent1");

    // The descriptor names the upload, which is the file beside it.
    let (ok, verdict, err) = verify(&node, &sub.join("firewall.wasm"));
    assert!(ok, "{err}");
    let verdict: Value = serde_json::from_str(&verdict).unwrap();
    let reference = format!("sha256:{}", verdict["sha256"].as_str().unwrap());
    assert_eq!(
        fw["descriptor"]["spec"]["wasm"]["module"],
        reference.as_str()
    );

    // ent1 lists it; ent2 neither lists nor sees it, nor may run it.
    let mine = node.json_as(&ent1, &["module", "list"]);
    let refs: Vec<&str> = mine
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["reference"].as_str().unwrap())
        .collect();
    assert_eq!(refs, [reference.as_str()], "{mine}");
    assert_eq!(mine[0]["name"], "firewall", "{mine}");
    assert_eq!(
        node.json_as(&ent2, &["module", "list"]),
        serde_json::json!([])
    );
    let out = node.cli_as(&ent2, &["module", "show", &reference]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("404"), "{}", stderr(&out));
    let theirs = node.path("theirs.yaml");
    std::fs::write(
        &theirs,
        firewall(
            "theirs",
            &reference,
            "{ policy: shared, group: g1, count: 1 }",
            "{ memory: 16MiB }",
        ),
    )
    .unwrap();
    let out = node.cli_as(&ent2, &["vnf", "create", "-f", theirs.to_str().unwrap()]);
    assert!(!out.status.success(), "ent2 ran ent1's module");
    let err = stderr(&out);
    assert!(
        err.contains("spec.wasm.module") && err.contains("ent2"),
        "{err}"
    );
    assert_eq!(node.json_as(&ent2, &["vnf", "list"]), serde_json::json!([]));
}

#[test]
fn a_file_that_is_not_wasm_is_refused_and_never_echoed() {
    let node = dev2(&[]);
    let ent1 = node.authority("ent1");
    let passwd =
        "root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n";
    std::fs::write(node.path("passwd.wasm"), passwd).unwrap();
    let descriptor = |name: &str, module: &str| {
        let file = node.path(&format!("{name}.yaml"));
        std::fs::write(
            &file,
            firewall(
                name,
                module,
                "{ policy: dedicated, count: 1 }",
                "{ memory: 16MiB }",
            ),
        )
        .unwrap();
        file.display().to_string()
    };

    // Uploaded by the CLI, refused by the node's verifier: the create fails at once.
    let mut attempts = vec![descriptor("leak1", "passwd.wasm")];
    // A host file named by its absolute path exists where the CLI runs, so it is uploaded and
    // refused the same way.
    if std::fs::read_to_string("/etc/passwd").is_ok_and(|t| t.starts_with("root:x")) {
        attempts.push(descriptor("leak2", "/etc/passwd"));
    }
    for file in &attempts {
        let out = node.cli_as(&ent1, &["vnf", "create", "-f", file]);
        assert!(!out.status.success(), "{file} was created");
        let (out_text, err) = (stdout(&out), stderr(&out));
        assert!(err.contains("refused by the verifier"), "{err}");
        assert!(
            !err.contains("root:x") && !out_text.contains("root:x"),
            "the file's content was echoed: {err}{out_text}"
        );
    }
    assert_eq!(node.json_as(&ent1, &["vnf", "list"]), serde_json::json!([]));
    assert_eq!(
        node.json_as(&ent1, &["module", "list"]),
        serde_json::json!([])
    );

    // The offline verdict agrees, without echoing either.
    let (ok, out_text, err) = verify(&node, &node.path("passwd.wasm"));
    assert!(!ok, "a text file verified: {out_text}");
    assert!(
        !err.contains("root:x") && !out_text.contains("root:x"),
        "the file's content was echoed: {err}{out_text}"
    );
    let verdict: Value = serde_json::from_str(&out_text).unwrap();
    assert_eq!(verdict["verdict"], "refused", "{verdict}");
    let (ok, out_text, err) = verify(&node, &node.path("examples/vnfs/firewall.wasm"));
    assert!(ok, "{err}");
    let verdict: Value = serde_json::from_str(&out_text).unwrap();
    assert_eq!(verdict["verdict"], "accepted", "{verdict}");
    assert_eq!(verdict["domain"], "untrusted", "{verdict}");
}

/// This machine's physical memory as /proc/meminfo states it, in bytes.
fn mem_total() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("MemTotal in /proc/meminfo");
    kib * 1024
}

const GIB: u64 = 1 << 30;

#[test]
fn memory_budgets_are_placed_against_the_memory_left_after_the_reserve() {
    let total = mem_total();
    if total < 11 * GIB {
        eprintln!("skipped: this machine has {total} bytes of memory, the test gives VNFs 10 GiB");
        return;
    }
    let allocatable = 10 * GIB;
    let reserve = (total - allocatable).to_string();
    let node = dev2(&["--memory-reserve", &reserve]);
    let host = node.json(&["host", "show", "dev"]);
    assert_eq!(host["memory_bytes"].as_u64(), Some(total), "{host}");

    // 4 GiB of linear memory each (plus maps and update log) in one shared group: two fit in
    // 10 GiB, the third does not.
    let mut placed = Vec::new();
    let mut pending = None;
    for i in 1..=4 {
        let name = format!("mem{i}");
        node.create(
            &format!("examples/descriptors/{name}.yaml"),
            &firewall(
                &name,
                "../vnfs/firewall.wasm",
                "{ policy: shared, group: g1, count: 1 }",
                "{ memory: 4GiB }",
            ),
        );
        let v = decided(&node, &name);
        if v["phase"] == "Pending" {
            pending = Some(v);
            break;
        }
        placed.push(v);
    }
    assert_eq!(
        placed.len(),
        2,
        "exactly the third must stay Pending: {placed:?}"
    );
    let pending = pending.expect("the third stays Pending");
    assert_eq!(pending["name"], "mem3");
    let budget = pending["memory_bytes"].as_u64().unwrap();
    assert!(
        budget > 4 * GIB,
        "the budget adds the maps and the log: {pending}"
    );
    for v in &placed {
        assert_eq!(v["memory_bytes"].as_u64(), Some(budget), "{v}");
        assert_eq!(v["placements"][0]["host"], "dev", "{v}");
    }
    let reason = pending["reason"].as_str().unwrap();
    let want = format!(
        "{} MiB of memory free (the VNF needs {} MiB)",
        (allocatable - 2 * budget) >> 20,
        budget >> 20
    );
    assert!(
        reason.contains(&want),
        "reason should say {want:?}: {reason}"
    );

    // The host's core map counts the two placed VNFs on the group's core, not the third.
    let host = node.json(&["host", "show", "dev"]);
    let group: Vec<&Value> = host["cpus"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["use"]["group"] == "g1")
        .collect();
    assert_eq!(group.len(), 1, "{host}");
    assert_eq!(group[0]["use"]["vcpus"], 2, "{host}");
    let table = stdout(&node.ok(&["vnf", "show", "mem3"]));
    assert!(table.contains("memory free"), "{table}");

    // Deleting one gives its budget back: the third is placed.
    node.ok(&["vnf", "delete", "mem1"]);
    let mem3 = node.wait_vnf("mem3", |v| v["phase"] != "Pending");
    assert_eq!(mem3["placements"][0]["host"], "dev", "{mem3}");

    // More than a wasm32 module can address is refused at create, naming the field.
    let err = {
        let file = node.path("examples/descriptors/huge.yaml");
        std::fs::write(
            &file,
            firewall(
                "huge",
                "../vnfs/firewall.wasm",
                "{ policy: shared, group: g1, count: 1 }",
                "{ memory: 8TiB }",
            ),
        )
        .unwrap();
        node.fails(
            &["vnf", "create", "-f", file.to_str().unwrap()],
            "spec.wasm.limits.memory",
        )
    };
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!node.cli(&["vnf", "show", "huge"]).status.success());
}

/// A vm VNF with boot disk `disk` that needs more dedicated CPUs than `dev` has: it is created
/// and stays Pending, so nothing boots.
fn vm_with_disk(name: &str, disk: &str) -> String {
    format!(
        "apiVersion: telvirt/v1\nkind: Vnf\nmetadata: {{ name: {name} }}\nspec:\n  runtime: vm\n  cpu: {{ policy: dedicated, count: 4 }}\n  vm: {{ memory: 64MiB, disk: {disk} }}\n"
    )
}

#[test]
fn a_host_path_must_be_granted_and_a_grant_in_use_is_not_revoked() {
    let node = dev2(&[]);
    let ent1 = node.authority("ent1");
    let file = node.path("vm1.yaml");
    let create = |disk: &str| {
        std::fs::write(&file, vm_with_disk("vm1", disk)).unwrap();
        node.cli_as(&ent1, &["vnf", "create", "-f", file.to_str().unwrap()])
    };

    // Not granted: 403 naming the field and how the admin grants it; nothing is created.
    let out = create("/etc/shadow");
    assert!(!out.status.success(), "/etc/shadow was accepted");
    let err = stderr(&out);
    assert!(
        err.contains("403") && err.contains("spec.vm.disk") && err.contains("--path"),
        "{err}"
    );
    assert_eq!(node.json_as(&ent1, &["vnf", "list"]), serde_json::json!([]));

    // Granted: a disk below the granted directory is accepted; one beside it is not.
    node.ok(&[
        "authority",
        "grant",
        "ent1",
        "--path",
        "/srv/tv-test-images/",
    ]);
    let grants = node.json_as(&ent1, &["authority", "grants", "ent1"]);
    assert!(
        grants.to_string().contains("/srv/tv-test-images/"),
        "{grants}"
    );
    let out = create("/srv/tv-test-images-other/a.img");
    assert!(
        !out.status.success(),
        "a path beside the grant was accepted"
    );
    assert!(stderr(&out).contains("spec.vm.disk"), "{}", stderr(&out));
    let out = create("/srv/tv-test-images/a.img");
    assert!(out.status.success(), "{}", stderr(&out));
    let vm1 = decided(&node, "vm1");
    assert_eq!(vm1["phase"], "Pending", "vm1 must not boot: {vm1}");

    // The grant is in use: revoking it is refused, naming the VNF, and the grant stays.
    let revoke = [
        "authority",
        "revoke",
        "ent1",
        "--path",
        "/srv/tv-test-images/",
    ];
    let err = node.fails(&revoke, "vm1");
    assert!(err.contains("/srv/tv-test-images/a.img"), "{err}");
    let grants = node.json(&["authority", "grants", "ent1"]);
    assert!(
        grants.to_string().contains("/srv/tv-test-images/"),
        "{grants}"
    );

    // Once the VNF is gone, the revoke goes through and the path is refused again.
    node.ok_as(&ent1, &["vnf", "delete", "vm1"]);
    let deadline = Instant::now() + DEADLINE;
    while node.cli_as(&ent1, &["vnf", "show", "vm1"]).status.success() {
        assert!(Instant::now() < deadline, "vm1 was never deleted");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    node.ok(&revoke);
    let grants = node.json(&["authority", "grants", "ent1"]);
    assert!(
        !grants.to_string().contains("/srv/tv-test-images/"),
        "{grants}"
    );
    let out = create("/srv/tv-test-images/a.img");
    assert!(!out.status.success(), "a revoked path was accepted");
    assert!(stderr(&out).contains("spec.vm.disk"), "{}", stderr(&out));
}
