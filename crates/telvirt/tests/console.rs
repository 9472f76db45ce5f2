//! The web console in a real headless Chromium (driven over WebDriver) against a real
//! `telvirt serve`: sign-in, the overview (VNFs by phase, a host's core grid), a VNF's page with
//! its live counters and maps, lock and unlock from its buttons seen through the API's watch
//! without a reload, a network's graph with its link counters and the sink's latency
//! histogram, and an authority that sees neither another's VNF nor who holds a core. Each page's
//! screenshot is saved under the target directory (`docs/console/` keeps copies).

mod common;

use common::webdriver::Browser;
use common::{Serve, lay_out_examples};

const INVENTORY: &str =
    "hosts:\n  - name: t\n    topology: { sockets: 1, cores_per_socket: 4, threads_per_core: 1 }\n";

fn shot(browser: &Browser, name: &str) {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("console");
    browser.screenshot(&dir.join(format!("{name}.png")));
}

fn number(text: &str, after: &str) -> u64 {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(after))
        .and_then(|rest| rest.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn the_console_shows_each_page_live_and_an_authority_only_its_own() {
    let dir = Serve::dir();
    std::fs::write(dir.path().join("inventory.yaml"), INVENTORY).unwrap();
    lay_out_examples(dir.path());
    let node = Serve::start_in(dir, &["--inventory", "inventory.yaml", "--host-name", "t"]);
    node.ok(&["vnf", "create", "-f", "examples/descriptors/fw1.yaml"]);
    node.wait_phase("fw1", "Running");
    let net = "apiVersion: telvirt/v1\nkind: Network\nmetadata: { name: t1 }\nspec:\n  nodes:\n    - { name: gen, kind: generator, rate_pps: 2000 }\n    - { name: sink, kind: sink }\n  links:\n    - gen.out -> fw1.in\n    - fw1.out -> sink.in\n";
    std::fs::write(node.path("t1.yaml"), net).unwrap();
    node.ok(&["net", "create", "-f", "t1.yaml"]);
    let tenant = node.authority("tenant");
    let ui = format!("{}/ui/", node.server());
    // The browser trusts the node's generated certificate by its public key, as an operator
    // who compared its fingerprint would; nothing else self-signed.
    let key = std::fs::read_to_string(node.path("data/tls/server.key")).unwrap();
    let spki =
        rcgen::PublicKeyData::subject_public_key_info(&rcgen::KeyPair::from_pem(&key).unwrap());
    let pin = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        <sha2::Sha256 as sha2::Digest>::digest(&spki),
    );
    let browser = Browser::start(&[pin]);

    // A wrong token is refused on the sign-in page.
    browser.goto(&ui);
    browser.type_into("#token", "tvt_wrong");
    browser.click("#signin-button");
    browser.wait_text("#signin-error", "a refusal", |t| t.contains("refused"));

    // Overview: fw1 Running among the VNFs by phase; the host's grid shows its core.
    browser.goto(&ui);
    browser.type_into("#token", &node.admin_token());
    browser.click("#signin-button");
    browser.wait_for("#vnf-rows[data-synced=\"yes\"]");
    browser.wait_text("tr[data-vnf=\"fw1\"] [data-phase]", "Running", |t| {
        t == "Running"
    });
    browser.wait_text("[data-phase-count=\"Running\"]", "one Running", |t| {
        t.ends_with(" 1")
    });
    browser.wait_for("[data-host=\"t\"] .cpu.vnf[data-holder=\"fw1\"]");
    browser.wait_for("[data-network=\"t1\"]");
    shot(&browser, "overview");

    // fw1's page: counters grow, its map is listed; lock and unlock from the buttons, seen
    // through the watch (no reload).
    browser.click("tr[data-vnf=\"fw1\"] a");
    browser.wait_text("#vnf-phase", "Running", |t| t == "Running");
    browser.wait_text("#stats", "packets received", |t| number(t, "received") > 0);
    browser.wait_text("#maps", "the rules map", |t| t.contains("rules: hash"));
    browser.wait_text("#events", "its creation", |t| {
        t.contains("created by admin")
    });
    shot(&browser, "vnf");
    browser.click("button[data-action=\"lock\"]");
    browser.wait_text("#vnf-phase", "Locked", |t| t == "Locked");
    browser.click("button[data-action=\"unlock\"]");
    browser.wait_text("#vnf-phase", "Running again", |t| t == "Running");

    // The network: its graph, each link's packets, the sink's latency histogram.
    browser.goto(&format!("{ui}#/net/t1"));
    browser.wait_for("svg [data-node=\"fw1\"]");
    browser.wait_text(
        "tr[data-link=\"fw1.out -> sink.in\"] .packets",
        "packets on the link",
        |t| t.parse::<u64>().is_ok_and(|n| n > 0),
    );
    browser.wait_text("[data-sink=\"sink\"] p", "frames received", |t| {
        number(&t.replace(", ", "\n").replace("sink ", ""), "received") > 0
    });
    let bars = browser.find_all("[data-sink=\"sink\"] .bars div").len();
    assert_eq!(bars, 20, "a bar per latency bucket");
    shot(&browser, "network");

    // Another authority: none of admin's VNFs, and the core fw1 holds shows only as in use.
    browser.goto(&ui);
    browser.click("#logout");
    browser.type_into("#token", &tenant);
    browser.click("#signin-button");
    browser.wait_for("#vnf-rows[data-synced=\"yes\"]");
    browser.wait_for("[data-host=\"t\"] .cpu.in-use");
    assert!(
        browser.find_all("tr[data-vnf]").is_empty(),
        "the tenant saw admin's VNFs"
    );
    assert!(
        browser.find_all("[data-holder=\"fw1\"]").is_empty(),
        "the tenant saw who holds a core"
    );
    assert!(
        browser.find_all("[data-network]").is_empty(),
        "the tenant saw admin's network"
    );
}
