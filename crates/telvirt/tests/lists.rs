//! `telvirt vnf list` against a real `telvirt serve`: `-l` selects by label, `--limit` sets the
//! page size and the CLI follows continue tokens to the last page; a bad selector or limit is
//! refused with the parameter named.

mod common;
use common::{Serve, stderr};

/// A vm VNF asking for more dedicated cores than the node has, so it stays Pending and no VM
/// starts; with `labels` (JSON object body, e.g. `"role": "edge"`).
fn descriptor(name: &str, labels: &str) -> String {
    format!(
        r#"{{ "apiVersion": "telvirt/v1", "kind": "Vnf",
  "metadata": {{ "name": "{name}", "labels": {{ {labels} }} }},
  "spec": {{ "runtime": "vm", "cpu": {{ "policy": "dedicated", "count": 1000 }},
    "ports": ["n3"], "vm": {{ "memory": "256MiB", "nics": [ {{ "port": "n3" }} ] }} }} }}"#
    )
}

fn names(list: &serde_json::Value) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn vnf_list_selects_by_label_and_follows_pages() {
    let server = Serve::start(&[]);
    let mut all = Vec::new();
    for i in 0..7 {
        let role = if i % 2 == 0 { "edge" } else { "core" };
        let name = format!("vnf{i}");
        server.create(
            &format!("{name}.json"),
            &descriptor(&name, &format!(r#""role": "{role}", "n": "{i}""#)),
        );
        all.push(name);
    }
    // Pages of 2 (four requests) make the whole list, in order, each VNF once.
    assert_eq!(names(&server.json(&["vnf", "list", "--limit", "2"])), all);
    assert_eq!(names(&server.json(&["vnf", "list"])), all);
    assert_eq!(
        names(&server.json(&["vnf", "list", "-l", "role=edge", "--limit", "1"])),
        ["vnf0", "vnf2", "vnf4", "vnf6"]
    );
    assert_eq!(
        names(&server.json(&["vnf", "list", "-l", "role!=edge,n!=1"])),
        ["vnf3", "vnf5"]
    );
    assert_eq!(
        names(&server.json(&["vnf", "list", "--selector", "!role"])),
        Vec::<String>::new()
    );
    // The table takes the same options.
    let out = server.ok(&["vnf", "list", "-l", "n=3"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.starts_with("NAME") && table.contains("vnf3"),
        "{table}"
    );
    assert!(!table.contains("vnf4"), "{table}");

    // A bad selector is the server's 422 naming the parameter; a bad limit the CLI's refusal.
    let err = server.fails(&["vnf", "list", "-l", "role=edge,"], "422");
    assert!(err.contains("labelSelector"), "{err}");
    let out = server.cli(&["vnf", "list", "--limit", "0"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--limit"), "{}", stderr(&out));
}
