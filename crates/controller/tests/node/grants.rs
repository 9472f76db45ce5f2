//! Host resources are granted, never assumed (ADR 045): every way an authority could name a host
//! path, interface or TAP is refused (403, the field, the missing grant) with nothing stored,
//! until the admin grants it; revoking refuses while in use. Modules are uploaded, verified and
//! owner-scoped.

use crate::common;

use common::{Node, firewall_ref, wasm_vnf};

fn vm_vnf(name: &str, vm: &str) -> String {
    format!(
        "apiVersion: telvirt/v1\nkind: Vnf\nmetadata: {{ name: {name} }}\nspec:\n  runtime: vm\n  cpu: {{ policy: dedicated, count: 1 }}\n  vm: {{ memory: 64MiB, {vm} }}\n"
    )
}

async fn refused_403(node: &Node, token: &str, yaml: &str, field: &str) {
    let before = node.names(&node.admin).await;
    let r = node.create_vnf(token, yaml).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.body["type"], "urn:telvirt:problem:not-granted");
    assert_eq!(r.error_paths(), [field], "{}", r.body);
    assert_eq!(node.names(&node.admin).await, before, "nothing stored");
}

async fn grant(node: &Node, who: &str, body: &str) -> common::Reply {
    node.call(
        "POST",
        "/v1/authorities/{name}/grants",
        Some(who),
        Some(&node.admin),
        Some((body.as_bytes(), "application/json")),
    )
    .await
}

/// Runs `request`, whose write the store holds, and revokes ent1's `grants` meanwhile (nothing
/// uses them yet): the request must write nothing and answer 409.
async fn refused_as_revoked_meanwhile(
    node: &Node,
    store: &common::hooked_store::HookedStore,
    grants: &str,
    request: impl std::future::Future<Output = common::Reply>,
) {
    let revoke = async {
        let r = revoke(node, "ent1", grants).await;
        assert_eq!(r.status, 200, "nothing uses the grant yet: {}", r.body);
    };
    refused_as_changed_meanwhile(store, request, revoke).await;
}

/// Runs `request`, whose write the store holds, and `meanwhile` while it is held: the request
/// must answer 409 (its authority changed under it).
async fn refused_as_changed_meanwhile(
    store: &common::hooked_store::HookedStore,
    request: impl std::future::Future<Output = common::Reply>,
    meanwhile: impl std::future::Future<Output = ()>,
) {
    let while_held = async {
        store.held.notified().await;
        meanwhile.await;
        store.go_on.notify_one();
    };
    let (r, ()) = tokio::join!(request, while_held);
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(
        r.body
            .to_string()
            .contains("changed while this request was checked"),
        "{}",
        r.body
    );
}

/// `token` attaches the device `body` (JSON) to VNF `vnf`.
async fn attach(node: &Node, token: &str, vnf: &str, body: &str) -> common::Reply {
    node.call(
        "POST",
        "/v1/vnfs/{name}/devices",
        Some(vnf),
        Some(token),
        Some((body.as_bytes(), "application/json")),
    )
    .await
}

async fn revoke(node: &Node, who: &str, body: &str) -> common::Reply {
    node.call(
        "DELETE",
        "/v1/authorities/{name}/grants",
        Some(who),
        Some(&node.admin),
        Some((body.as_bytes(), "application/json")),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_kernel_initrd_and_disk_are_host_paths_that_must_be_granted() {
    let node = Node::start().await;
    let ent = node.create_authority("ent1").await;
    // The attacks: a root-owned file, a block device, traversal out of nothing.
    refused_403(
        &node,
        &ent,
        &vm_vnf("v1", "disk: /etc/shadow"),
        "spec.vm.disk",
    )
    .await;
    refused_403(&node, &ent, &vm_vnf("v1", "disk: /dev/vda"), "spec.vm.disk").await;
    refused_403(
        &node,
        &ent,
        &vm_vnf("v1", "kernel: /boot/vmlinuz"),
        "spec.vm.kernel",
    )
    .await;
    refused_403(
        &node,
        &ent,
        &vm_vnf("v1", "kernel: /srv/k, initrd: /root/initrd"),
        "spec.vm.kernel",
    )
    .await;
    // Granted a directory: below it is fine, traversal out of it is not.
    let r = grant(&node, "ent1", r#"{"paths":["/srv/images/"]}"#).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["paths"][0], "/srv/images/");
    refused_403(
        &node,
        &ent,
        &vm_vnf("v1", "disk: /srv/images/../../etc/shadow"),
        "spec.vm.disk",
    )
    .await;
    refused_403(
        &node,
        &ent,
        &vm_vnf("v1", "disk: /srv/imagesX/a"),
        "spec.vm.disk",
    )
    .await;
    let r = node
        .create_vnf(&ent, &vm_vnf("v1", "disk: /srv/images/a.img"))
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    // Revoking what a VNF uses is refused and names the VNF; nothing changes.
    let r = revoke(&node, "ent1", r#"{"paths":["/srv/images/"]}"#).await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(
        r.body["detail"].as_str().unwrap().contains("vnf v1"),
        "{}",
        r.body
    );
    let r = node
        .call(
            "GET",
            "/v1/authorities/{name}/grants",
            Some("ent1"),
            Some(&ent),
            None,
        )
        .await;
    assert_eq!(r.body["paths"][0], "/srv/images/", "{}", r.body);
    // Once unused, it goes.
    let r = node
        .call("DELETE", "/v1/vnfs/{name}", Some("v1"), Some(&ent), None)
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    let r = revoke(&node, "ent1", r#"{"paths":["/srv/images/"]}"#).await;
    assert_eq!(r.status, 200, "{}", r.body);
    refused_403(
        &node,
        &ent,
        &vm_vnf("v1", "disk: /srv/images/a.img"),
        "spec.vm.disk",
    )
    .await;
    // The admin is not confined.
    let r = node
        .create_vnf(&node.admin, &vm_vnf("v2", "disk: /srv/other/a.img"))
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_are_the_admins_and_each_authority_sees_only_its_own() {
    let node = Node::start().await;
    let ent1 = node.create_authority("ent1").await;
    let ent2 = node.create_authority("ent2").await;
    // Only the admin grants.
    let r = node
        .call(
            "POST",
            "/v1/authorities/{name}/grants",
            Some("ent1"),
            Some(&ent1),
            Some((br#"{"interfaces":["eth1"]}"#, "application/json")),
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.body);
    // Bad entries are refused with their index, and nothing is granted.
    for (body, field) in [
        (r#"{"paths":["relative/dir/"]}"#, "paths[0]"),
        (r#"{"paths":["/a/../b"]}"#, "paths[0]"),
        (r#"{"interfaces":["*"]}"#, "interfaces[0]"),
        (r#"{"taps":["a/b"]}"#, "taps[0]"),
    ] {
        let r = grant(&node, "ent1", body).await;
        assert_eq!(r.status, 422, "{body}: {}", r.body);
        assert_eq!(r.error_paths(), [field], "{}", r.body);
    }
    let r = grant(&node, "ent1", r#"{"paths":[],"turbo":1}"#).await;
    assert_eq!(r.status, 422, "{}", r.body);
    let r = grant(&node, "nobody", r#"{"interfaces":["eth1"]}"#).await;
    assert_eq!(r.status, 404, "{}", r.body);
    let r = grant(&node, "ent1", r#"{"interfaces":["eth1"],"taps":["tv-*"]}"#).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // ent1 sees its own; ent2 gets 404 for ent1's and an empty set for its own.
    let r = node
        .call(
            "GET",
            "/v1/authorities/{name}/grants",
            Some("ent1"),
            Some(&ent1),
            None,
        )
        .await;
    assert_eq!(r.body["interfaces"][0], "eth1", "{}", r.body);
    let r = node
        .call(
            "GET",
            "/v1/authorities/{name}/grants",
            Some("ent1"),
            Some(&ent2),
            None,
        )
        .await;
    assert_eq!(r.status, 404, "{}", r.body);
    let r = node
        .call(
            "GET",
            "/v1/authorities/{name}/grants",
            Some("ent2"),
            Some(&ent2),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.as_object().unwrap().is_empty(), "{}", r.body);
    // Revoking what is not held says so.
    let r = revoke(&node, "ent1", r#"{"interfaces":["eth9"]}"#).await;
    assert_eq!(r.status, 404, "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_name_granted_files_and_taps_only() {
    let node = Node::start().await;
    let ent = node.create_authority("ent1").await;
    let r = node
        .create_vnf(&node.admin, &vm_vnf("v1", "cmdline: quiet"))
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    // Owned by ent1 instead: create as ent1.
    let r = node.create_vnf(&ent, &vm_vnf("v2", "cmdline: quiet")).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let attach = |body: &'static str| attach(&node, &ent, "v2", body);
    let r = attach(r#"{"id":"d0","kind":"blk","path":"/etc/shadow"}"#).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.error_paths(), ["path"]);
    let r = attach(r#"{"id":"n0","kind":"net","tap":"tap0"}"#).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.error_paths(), ["tap"]);
    let r = grant(&node, "ent1", r#"{"paths":["/srv/d/"],"taps":["tv-*"]}"#).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = attach(r#"{"id":"d0","kind":"blk","path":"/srv/d/a.img"}"#).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let r = attach(r#"{"id":"n0","kind":"net","tap":"tv-ent1"}"#).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let r = attach(r#"{"id":"n1","kind":"net","tap":"tap0"}"#).await;
    assert_eq!(r.status, 403, "{}", r.body);
    // A granted device in use keeps its grant.
    let r = revoke(&node, "ent1", r#"{"taps":["tv-*"]}"#).await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(
        r.body["detail"]
            .as_str()
            .unwrap()
            .contains("devices[n0].tap"),
        "{}",
        r.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_interface_link_needs_a_granted_interface() {
    let node = Node::start().await;
    let ent = node.create_authority("ent1").await;
    assert_eq!(node.create_vnf(&ent, &wasm_vnf("myvnf")).await.status, 201);
    let net = |from: &str, to: &str| {
        format!(
            "apiVersion: telvirt/v1\nkind: Network\nmetadata: {{ name: n1 }}\nspec:\n  links:\n    - {from} -> {to}\n"
        )
    };
    for (body, field) in [
        (net("host:lo", "myvnf.in"), "spec.links[0].from"),
        (net("myvnf.out", "host:lo"), "spec.links[0].to"),
    ] {
        let r = node.create_network(&ent, &body).await;
        assert_eq!(r.status, 403, "{}", r.body);
        assert_eq!(r.error_paths(), [field], "{}", r.body);
        assert!(
            r.body["detail"]
                .as_str()
                .unwrap()
                .contains("--interface lo")
        );
    }
    let r = node
        .call("GET", "/v1/networks", None, Some(&ent), None)
        .await;
    assert_eq!(r.body.as_array().unwrap().len(), 0, "nothing stored");
    let r = grant(&node, "ent1", r#"{"interfaces":["veth-e1*"]}"#).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let body = net("host:veth-e1a", "myvnf.in");
    let r = node.create_network(&ent, &body).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let r = revoke(&node, "ent1", r#"{"interfaces":["veth-e1*"]}"#).await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.body["detail"].as_str().unwrap().contains("network n1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn module_paths_on_the_node_are_the_admins_or_granted() {
    let node = Node::start().await;
    let ent = node.create_authority("ent1").await;
    let with_module = |m: &str| wasm_vnf("fw1").replace(&format!("\"{}\"", firewall_ref()), m);
    for module in [
        "/etc/shadow",
        "/dev/zero",
        "fw.wasm",
        "/srv/m/../../etc/passwd",
    ] {
        refused_403(&node, &ent, &with_module(module), "spec.wasm.module").await;
    }
    // The admin may still name a path on the node (the agent reads it safely).
    let r = node
        .create_vnf(&node.admin, &with_module("/srv/m/fw.wasm"))
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modules_are_verified_at_upload_and_scoped_to_their_owner() {
    let node = Node::start().await;
    let ent1 = node.create_authority("ent1").await;
    let ent2 = node.create_authority("ent2").await;
    // Not wasm: refused with the verifier's reasons, none of which echo the bytes.
    let r = node
        .upload(&ent1, b"root:x:0:0:root:/root:/bin/bash\n")
        .await;
    assert_eq!(r.status, 422, "{}", r.body);
    let text = r.body.to_string();
    assert!(!text.contains("root:x"), "{text}");
    assert!(!r.error_paths().is_empty(), "{text}");
    // A module asking for a permission the uploader's domain lacks.
    // The firewall asking for `log` too (name shortened to keep the section's length).
    let mut logging = common::firewall_wasm().to_vec();
    let from: &[u8] = br#""name":"firewall","version":"1.0.0","permissions":["maps.read","maps.write","counters"]"#;
    let to: &[u8] = br#""name":"fw","version":"1.0.0","permissions":["maps.read","maps.write","counters","log"]"#;
    let at = logging.windows(from.len()).position(|w| w == from).unwrap();
    logging[at..at + from.len()].copy_from_slice(to);
    let r = node.upload(&ent1, &logging).await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(r.body.to_string().contains("untrusted"), "{}", r.body);
    // Over the cap: 413 before anything is verified.
    let big = vec![0u8; (16 << 20) + 1];
    let r = node.upload(&ent1, &big).await;
    assert_eq!(r.status, 413, "{}", r.body);
    // Uploaded once, listed for its uploader only; a second upload answers 200.
    let again = node.upload_firewall(&ent1).await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.body["reference"], firewall_ref());
    assert_eq!(again.body["name"], "firewall");
    let r = node
        .call("GET", "/v1/modules", None, Some(&ent1), None)
        .await;
    assert_eq!(r.body.as_array().unwrap().len(), 1, "{}", r.body);
    // A module nobody of yours uploaded cannot be named.
    let ent3 = {
        let body = br#"{"name":"ent3"}"#;
        let r = node
            .call(
                "POST",
                "/v1/authorities",
                None,
                Some(&node.admin),
                Some((body, "application/json")),
            )
            .await;
        r.body["token"].as_str().unwrap().to_owned()
    };
    let r = node.create_vnf(&ent3, &wasm_vnf("fw3")).await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert_eq!(r.error_paths(), ["spec.wasm.module"], "{}", r.body);
    // Descriptor maps the module does not declare are refused at create.
    let extra = wasm_vnf("fw2").replace(
        "    limits:",
        "    maps: [ { name: nope, kind: hash, key_size: 4, value_size: 4, max_entries: 8 } ]\n    limits:",
    );
    let r = node.create_vnf(&ent2, &extra).await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert_eq!(r.error_paths(), ["spec.wasm.maps[0].name"], "{}", r.body);
    // In use: the owner cannot delete it; once the VNF is gone it can.
    assert_eq!(node.create_vnf(&ent2, &wasm_vnf("fw2")).await.status, 201);
    let hex = firewall_ref().trim_start_matches("sha256:").to_owned();
    let r = node
        .call_at(
            "DELETE",
            "/v1/modules/{sha256}",
            &[("sha256", &hex)],
            Some(&ent2),
            None,
        )
        .await;
    assert_eq!(r.status, 409, "{}", r.body);
    // ent1 forgets its own upload (others still keep the module).
    let r = node
        .call_at(
            "DELETE",
            "/v1/modules/{sha256}",
            &[("sha256", &hex)],
            Some(&ent1),
            None,
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    let r = node
        .call("GET", "/v1/modules", None, Some(&ent1), None)
        .await;
    assert_eq!(r.body.as_array().unwrap().len(), 0, "{}", r.body);
    let r = node.create_vnf(&ent1, &wasm_vnf("fw1")).await;
    assert_eq!(r.status, 422, "{}", r.body);
    // The VNF shows the memory placement counts for it.
    let r = node
        .call("GET", "/v1/vnfs/{name}", Some("fw2"), Some(&ent2), None)
        .await;
    assert!(
        r.body["memory_bytes"].as_u64().unwrap() >= 16 << 20,
        "{}",
        r.body
    );
}

/// A grant revoked while a request that relied on it waits to be written makes that request
/// write nothing (409: send it again), so no VNF is left using a host resource its authority
/// no longer holds (the revoke's check of what is in use ran before the write).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_revoked_while_a_request_relied_on_it_makes_it_write_nothing() {
    let (node, store) = Node::start_hooked().await;
    let ent = node.create_authority("ent1").await;
    let r = node.create_vnf(&ent, &vm_vnf("v2", "cmdline: quiet")).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let r = grant(&node, "ent1", r#"{"paths":["/srv/d/"]}"#).await;
    assert_eq!(r.status, 200, "{}", r.body);

    *store.hold_write.lock().unwrap() = Some(telvirt_controller::records::vnf_key("v2"));
    let attach = attach(
        &node,
        &ent,
        "v2",
        r#"{"id":"d0","kind":"blk","path":"/srv/d/a.img"}"#,
    );
    refused_as_revoked_meanwhile(&node, &store, r#"{"paths":["/srv/d/"]}"#, attach).await;
    let v2 = node.vnf_json("v2").await;
    assert!(
        v2["devices"].as_array().is_none_or(Vec::is_empty),
        "no device stored: {v2}"
    );
}

/// An authority deleted while a VNF it sent waits to be written: the VNF is not written (409),
/// the deletion completes, the token is dead, and a new authority of the same name starts with
/// nothing of the old one's: no VNF, no module it uploaded (a module another authority
/// uploaded too stays that one's; one nobody else uploaded goes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authority_deleted_while_its_request_waits_leaves_nothing_behind() {
    let (node, store) = Node::start_hooked().await;
    let ent1 = node.create_authority("ent1").await;
    // Both upload the firewall (`create_authority` does).
    let ent2 = node.create_authority("ent2").await;
    let modules = |token: String| {
        let node = &node;
        async move {
            let r = node
                .call("GET", "/v1/modules", None, Some(&token), None)
                .await;
            assert_eq!(r.status, 200, "{}", r.body);
            r.body.as_array().unwrap().len()
        }
    };
    let delete = |who: &'static str| {
        node.call(
            "DELETE",
            "/v1/authorities/{name}",
            Some(who),
            Some(&node.admin),
            None,
        )
    };

    *store.hold_write.lock().unwrap() = Some(telvirt_controller::records::vnf_key("v1"));
    let v1 = wasm_vnf("v1");
    let create = node.create_vnf(&ent1, &v1);
    let delete_ent1 = async {
        let r = delete("ent1").await;
        assert_eq!(r.status, 204, "it owned nothing yet: {}", r.body);
    };
    refused_as_changed_meanwhile(&store, create, delete_ent1).await;
    assert!(node.names(&node.admin).await.is_empty(), "no VNF stored");
    let r = node.call("GET", "/v1/vnfs", None, Some(&ent1), None).await;
    assert_eq!(r.status, 401, "the old token: {}", r.body);

    // Created again (not through `create_authority`, which uploads the firewall).
    let again = bare_authority(&node, "ent1").await;
    // A request sent while its authority's deletion ends (after the deletion read what the
    // authority owns) is refused too: the deletion's first step took the token.
    *store.hold_delete.lock().unwrap() = Some(telvirt_controller::records::grants_key("ent1"));
    let v3 = vm_vnf("v3", "cmdline: quiet");
    let deleting = delete("ent1");
    let create_while_held = async {
        store.held.notified().await;
        let r = node.create_vnf(&again, &v3).await;
        store.go_on.notify_one();
        r
    };
    let (deleted, created) = tokio::join!(deleting, create_while_held);
    assert_eq!(deleted.status, 204, "{}", deleted.body);
    assert_eq!(created.status, 401, "{}", created.body);
    assert!(node.names(&node.admin).await.is_empty(), "no VNF stored");
    let again = bare_authority(&node, "ent1").await;
    assert_eq!(modules(again.clone()).await, 0, "none of the old ent1's");
    let r = node.create_vnf(&again, &wasm_vnf("v1")).await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert_eq!(modules(ent2.clone()).await, 1, "ent2's upload stays");
    // A module only ent2 uploaded goes with ent2 (the firewall stays: the admin's too).
    let (_, nat) = telvirt_agent::runtimes::wasm::example_modules()
        .into_iter()
        .find(|(name, _)| *name != "firewall")
        .unwrap();
    let r = node.upload(&ent2, nat).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(modules(node.admin.clone()).await, 2);
    let r = delete("ent2").await;
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(modules(node.admin.clone()).await, 1, "ent2's alone: gone");
    let digest = telvirt_controller::modules::sha256_hex(nat);
    let r = node
        .call_at(
            "GET",
            "/v1/modules/{sha256}",
            &[("sha256", &digest)],
            Some(&node.admin),
            None,
        )
        .await;
    assert_eq!(r.status, 404, "{}", r.body);
}

/// An upload refused because its uploader changed while its index waited to be written (its
/// chunks were written before) leaves none of the module's bytes in the store; the same upload
/// sent again is kept whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_refused_as_its_uploader_changed_leaves_no_bytes_behind() {
    let (node, store) = Node::start_hooked().await;
    let ent1 = bare_authority(&node, "ent1").await;
    let (_, nat) = telvirt_agent::runtimes::wasm::example_modules()
        .into_iter()
        .find(|(name, _)| *name != "firewall")
        .unwrap();
    let digest = telvirt_controller::modules::sha256_hex(nat);
    let chunks = || async {
        let all = node
            .store
            .list(telvirt_controller::records::MODULE_BYTES)
            .await
            .unwrap();
        all.iter().filter(|(k, _)| k.contains(&digest)).count()
    };
    *store.hold_write.lock().unwrap() = Some(telvirt_controller::records::module_key(&digest));
    let granted = async {
        let r = grant(&node, "ent1", r#"{"paths":["/srv/d/"]}"#).await;
        assert_eq!(r.status, 200, "{}", r.body);
    };
    refused_as_changed_meanwhile(&store, node.upload(&ent1, nat), granted).await;
    assert_eq!(chunks().await, 0, "no chunk of the refused upload stays");

    let r = node.upload(&ent1, nat).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert!(chunks().await > 0);
}

/// Authority `name`, created with no module uploaded (unlike `create_authority`): its token.
async fn bare_authority(node: &Node, name: &str) -> String {
    let r = node
        .create_authority_json(&format!("{{\"name\":\"{name}\"}}"))
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    r.body["token"].as_str().unwrap().to_owned()
}

/// So does a network that links a granted host interface: revoked while its write waits, it is
/// not stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_revoked_while_a_network_relied_on_it_makes_it_write_nothing() {
    let (node, store) = Node::start_hooked().await;
    let ent = node.create_authority("ent1").await;
    assert_eq!(node.create_vnf(&ent, &wasm_vnf("myvnf")).await.status, 201);
    let r = grant(&node, "ent1", r#"{"interfaces":["veth-e1*"]}"#).await;
    assert_eq!(r.status, 200, "{}", r.body);
    *store.hold_write.lock().unwrap() = Some(telvirt_controller::network::network_key("n1"));
    let body = "apiVersion: telvirt/v1\nkind: Network\nmetadata: { name: n1 }\nspec:\n  links:\n    - host:veth-e1a -> myvnf.in\n";
    let create = node.create_network(&ent, body);
    refused_as_revoked_meanwhile(&node, &store, r#"{"interfaces":["veth-e1*"]}"#, create).await;
    let r = node
        .call("GET", "/v1/networks", None, Some(&ent), None)
        .await;
    assert_eq!(r.body.as_array().unwrap().len(), 0, "nothing stored");
}
