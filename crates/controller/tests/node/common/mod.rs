//! A real node for API tests: redb store in a temp dir, controller, the agent (with no runtimes)
//! and the HTTP server on an ephemeral loopback port. Every response the tests receive is checked
//! against the OpenAPI document, so the two cannot drift.

#![allow(dead_code)]

pub mod hooked_store;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use telvirt_agent::Agent;
use telvirt_controller::modules::{ModuleRepository, ModuleVerifier, sha256_hex};
use telvirt_controller::{Controller, HostRecord, LocalLink, openapi_document, router};
use telvirt_model::api::ModuleInfo;
use telvirt_sched::{HostSpec, SchedConfig, TopologySpec};
use telvirt_store::RedbStore;

pub struct Node {
    pub base: String,
    pub admin: String,
    pub controller: Arc<Controller>,
    /// The controller's store, for checks over all of it.
    pub store: Arc<dyn telvirt_store::Store>,
    http: reqwest::Client,
    openapi: Value,
    _dir: tempfile::TempDir,
}

pub struct Reply {
    pub status: u16,
    pub content_type: String,
    pub body: Value,
}

impl Reply {
    /// The `path` of every refused field of a problem answer, in order.
    pub fn error_paths(&self) -> Vec<&str> {
        self.body["errors"]
            .as_array()
            .map(|e| e.iter().filter_map(|e| e["path"].as_str()).collect())
            .unwrap_or_default()
    }
}

fn escape(pointer_part: &str) -> String {
    pointer_part.replace('~', "~0").replace('/', "~1")
}

impl Node {
    pub async fn start() -> Node {
        Node::start_on(|path| RedbStore::open(path).unwrap()).await
    }

    /// [`Node::start`] on the store `open` makes at the path it is given.
    /// A node on a store whose writes the test can hold or fail ([`hooked_store::HookedStore`]),
    /// with that store.
    pub async fn start_hooked() -> (Node, Arc<hooked_store::HookedStore>) {
        let mut hooked = None;
        let node = Node::start_on(|path| {
            let store = hooked_store::HookedStore::open(path);
            hooked = Some(store.clone());
            store
        })
        .await;
        (node, hooked.expect("start_on opened the store"))
    }

    pub async fn start_on(
        open: impl FnOnce(&std::path::Path) -> Arc<dyn telvirt_store::Store>,
    ) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir.path().join("store.redb"));
        let controller = Controller::open(store.clone(), SchedConfig::default())
            .await
            .unwrap();
        controller
            .register_host(HostRecord {
                qemu_machines: Vec::new(),
                accel: None,
                cpu: None,
                spec: HostSpec {
                    name: "h1".into(),
                    topology: Some(TopologySpec {
                        sockets: 1,
                        cores_per_socket: 8,
                        threads_per_core: 1,
                        numa_nodes_per_socket: 1,
                        memory_per_node: None,
                    }),
                    shared: "0".parse().unwrap(),
                    ..HostSpec::default()
                },
                memory_bytes: 1 << 30,
                hugepages: Vec::new(),
                runtimes: Vec::new(),
                agent: true,
                tunnel: None,
                qemu: None,
            })
            .await
            .unwrap();
        let admin = controller.ensure_admin(None).await.unwrap().unwrap();
        controller.set_module_repository(ModuleRepository::new(
            dir.path().join("modules"),
            Arc::new(DefaultVerifier),
        ));
        let agent = Arc::new(Agent::new(
            "h1",
            Vec::new(),
            Arc::new(LocalLink::new(controller.clone(), "h1")),
            dir.path().join("instances"),
        ));
        let (_tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let _keep = _tx;
            agent.run(rx).await;
        });
        tokio::spawn(
            controller
                .clone()
                .scheduling_loop(Duration::from_millis(200)),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let app = router(controller.clone());
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        let node = Node {
            base,
            admin,
            controller,
            store,
            http: reqwest::Client::new(),
            openapi: openapi_document(),
            _dir: dir,
        };
        node.upload_firewall(&node.admin).await;
        node
    }

    /// Uploads the example firewall module as `token`'s authority (what `wasm_vnf` runs).
    pub async fn upload_firewall(&self, token: &str) -> Reply {
        let r = self.upload(token, firewall_wasm()).await;
        assert!(r.status == 201 || r.status == 200, "{}", r.body);
        r
    }

    /// `POST /v1/modules` with `bytes`.
    pub async fn upload(&self, token: &str, bytes: &[u8]) -> Reply {
        self.call(
            "POST",
            "/v1/modules",
            None,
            Some(token),
            Some((bytes, "application/wasm")),
        )
        .await
    }

    /// Sends a request to the path `template` with `{name}` filled in, and checks the answer
    /// against the OpenAPI document.
    pub async fn call(
        &self,
        method: &str,
        template: &str,
        name: Option<&str>,
        token: Option<&str>,
        body: Option<(&[u8], &str)>,
    ) -> Reply {
        let params: Vec<(&str, &str)> = name.map(|n| ("name", n)).into_iter().collect();
        self.call_at(method, template, &params, token, body).await
    }

    /// [`Node::call`] with every `{param}` of `template` filled from `params`.
    pub async fn call_at(
        &self,
        method: &str,
        template: &str,
        params: &[(&str, &str)],
        token: Option<&str>,
        body: Option<(&[u8], &str)>,
    ) -> Reply {
        let mut path = template.to_owned();
        for (k, v) in params {
            path = path.replace(&format!("{{{k}}}"), v);
        }
        let mut req = self
            .http
            .request(method.parse().unwrap(), format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some((bytes, ct)) = body {
            req = req.header("content-type", ct).body(bytes.to_vec());
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().split(';').next().unwrap().to_owned())
            .unwrap_or_default();
        let bytes = resp.bytes().await.unwrap();
        let body: Value = if content_type.contains("json") {
            serde_json::from_slice(&bytes).unwrap()
        } else {
            Value::String(String::from_utf8_lossy(&bytes).into_owned())
        };
        // A query in the template is sent, not looked up in the document.
        let documented = template.split('?').next().unwrap_or(template);
        self.check_against_openapi(method, documented, status, &content_type, &body);
        Reply {
            status,
            content_type,
            body,
        }
    }

    /// Panics unless `body`, answered with `status` and `content_type` to `method template`,
    /// is what the OpenAPI document says.
    pub fn check_against_openapi(
        &self,
        method: &str,
        template: &str,
        status: u16,
        content_type: &str,
        body: &Value,
    ) {
        let method = method.to_ascii_lowercase();
        let op = self
            .openapi
            .pointer(&format!("/paths/{}/{method}", escape(template)))
            .unwrap_or_else(|| panic!("{method} {template} is not in the OpenAPI document"));
        let response = op
            .pointer(&format!("/responses/{status}"))
            .unwrap_or_else(|| {
                panic!("{method} {template} answered {status}, which the OpenAPI document does not list: {body}")
            });
        let Some(content) = response.get("content") else {
            assert!(
                body.as_str().is_some_and(str::is_empty),
                "{method} {template} {status}: documented without content but answered {body}"
            );
            return;
        };
        let media = content.get(content_type).unwrap_or_else(|| {
            panic!("{method} {template} {status}: content type {content_type} is not documented")
        });
        let Some(_) = media.get("schema") else { return };
        let pointer = format!(
            "#/paths/{}/{method}/responses/{status}/content/{}/schema",
            escape(template),
            escape(content_type)
        );
        // A URI fragment: braces of path templates must be percent-encoded.
        let pointer = pointer.replace('{', "%7B").replace('}', "%7D");
        let mut schema = self.openapi.clone();
        schema["$ref"] = Value::String(pointer);
        let validator = jsonschema::options()
            .with_draft(jsonschema::Draft::Draft202012)
            .build(&schema)
            .unwrap();
        let errors: Vec<String> = validator
            .iter_errors(body)
            .map(|e| format!("{} at {}", e, e.instance_path))
            .collect();
        assert!(
            errors.is_empty(),
            "{method} {template} {status}: the answer does not match the OpenAPI schema: {errors:?}\n{body}"
        );
    }

    /// A request outside the documented API: (status, content type).
    pub async fn http_raw(&self, method: &str, path: &str) -> (u16, String) {
        let resp = self
            .http
            .request(method.parse().unwrap(), format!("{}{path}", self.base))
            .bearer_auth(&self.admin)
            .send()
            .await
            .unwrap();
        let ct = resp
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        (resp.status().as_u16(), ct)
    }

    /// `POST /v1/authorities` as admin with a JSON body.
    pub async fn create_authority_json(&self, body: &str) -> Reply {
        self.call(
            "POST",
            "/v1/authorities",
            None,
            Some(&self.admin),
            Some((body.as_bytes(), "application/json")),
        )
        .await
    }

    pub async fn create_authority(&self, name: &str) -> String {
        let r = self
            .create_authority_json(&format!("{{\"name\":\"{name}\"}}"))
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
        let token = r.body["token"].as_str().unwrap().to_owned();
        self.upload_firewall(&token).await;
        token
    }

    /// `POST /v1/networks` of the YAML descriptor `yaml` as the holder of `token`.
    pub async fn create_network(&self, token: &str, yaml: &str) -> Reply {
        self.call(
            "POST",
            "/v1/networks",
            None,
            Some(token),
            Some((yaml.as_bytes(), "application/yaml")),
        )
        .await
    }

    pub async fn create_vnf(&self, token: &str, yaml: &str) -> Reply {
        self.call(
            "POST",
            "/v1/vnfs",
            None,
            Some(token),
            Some((yaml.as_bytes(), "application/yaml")),
        )
        .await
    }

    /// `GET /v1/vnfs?{query}` (query already encoded), checked against the OpenAPI document;
    /// with the `X-Continue` header, which must be documented when it is sent.
    pub async fn list_vnfs(&self, token: &str, query: &str) -> (Reply, Option<String>) {
        let resp = self
            .http
            .get(format!("{}/v1/vnfs?{query}", self.base))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let next = resp
            .headers()
            .get("x-continue")
            .map(|v| v.to_str().unwrap().to_owned());
        let content_type = resp
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().split(';').next().unwrap().to_owned())
            .unwrap_or_default();
        let body: Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
        self.check_against_openapi("GET", "/v1/vnfs", status, &content_type, &body);
        if next.is_some() {
            assert!(
                self.openapi
                    .pointer(&format!(
                        "/paths/{}/get/responses/{status}/headers/X-Continue",
                        escape("/v1/vnfs")
                    ))
                    .is_some(),
                "GET /v1/vnfs {status} sent X-Continue, which the OpenAPI document does not list"
            );
        }
        let reply = Reply {
            status,
            content_type,
            body,
        };
        (reply, next)
    }

    /// Names of the VNFs `token` can list.
    pub async fn names(&self, token: &str) -> Vec<String> {
        let r = self.call("GET", "/v1/vnfs", None, Some(token), None).await;
        assert_eq!(r.status, 200);
        r.body
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap().to_owned())
            .collect()
    }

    /// [`Node::start`] with a 300 ms host lease, heal delay `heal_after` (`None`: never) and
    /// its liveness monitor running (a pass every 100 ms at least).
    pub async fn start_monitored(heal_after: Option<Duration>) -> Node {
        Node::monitored(Node::start().await, heal_after)
    }

    /// [`Node::start_monitored`] of a node already started.
    pub fn monitored(node: Node, heal_after: Option<Duration>) -> Node {
        node.controller
            .set_host_lease_ttl(Duration::from_millis(300))
            .unwrap();
        node.controller.set_heal_after(heal_after);
        tokio::spawn(
            node.controller
                .clone()
                .host_monitor(Duration::from_millis(100)),
        );
        node
    }

    /// Cordons host `host` as admin.
    pub async fn cordon(&self, host: &str) {
        self.host_action(host, "cordon").await;
    }

    /// Uncordons host `host` as admin.
    pub async fn uncordon(&self, host: &str) {
        self.host_action(host, "uncordon").await;
    }

    async fn host_action(&self, host: &str, what: &str) {
        let r = self
            .call(
                "POST",
                &format!("/v1/hosts/{{name}}/{what}"),
                Some(host),
                Some(&self.admin),
                None,
            )
            .await;
        assert_eq!(r.status, 200, "{what} {host}: {}", r.body);
    }

    /// `POST /v1/vnfs/{name}/{action}` (`start`, `stop`, `lock`, `unlock`) as `token`.
    pub async fn vnf_action(&self, token: &str, name: &str, action: &str) -> Reply {
        self.call_at(
            "POST",
            &format!("/v1/vnfs/{{name}}/{action}"),
            &[("name", name)],
            Some(token),
            None,
        )
        .await
    }

    /// The events of VNF `vnf`, as admin.
    pub async fn events(&self, vnf: &str) -> Vec<Value> {
        let r = self
            .call(
                "GET",
                "/v1/vnfs/{name}/events",
                Some(vnf),
                Some(&self.admin),
                None,
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        r.body.as_array().unwrap().clone()
    }

    /// VNF `name` as admin sees it.
    pub async fn vnf_json(&self, name: &str) -> Value {
        let r = self
            .call(
                "GET",
                "/v1/vnfs/{name}",
                Some(name),
                Some(&self.admin),
                None,
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        r.body
    }

    /// Polls a VNF until `pred` holds on it, with a deadline.
    pub async fn wait_vnf(&self, token: &str, name: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let r = self
                .call("GET", "/v1/vnfs/{name}", Some(name), Some(token), None)
                .await;
            if r.status == 200 && pred(&r.body) {
                return r.body;
            }
            assert!(
                Instant::now() < deadline,
                "vnf {name} did not reach the expected state: {}",
                r.body
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// (role, host) of each of VNF `v`'s placements, in order.
pub fn role_hosts(v: &Value) -> Vec<(String, String)> {
    v["placements"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["role"].as_str().unwrap().to_owned(),
                p["host"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Heartbeats for `host` every 50 ms until aborted: a stand-in for that host's agent.
pub fn beat(controller: &Arc<Controller>, host: &str) -> tokio::task::JoinHandle<()> {
    let (controller, host) = (controller.clone(), host.to_owned());
    tokio::spawn(async move {
        loop {
            controller.heartbeat(&host).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

/// The example firewall module's bytes.
pub fn firewall_wasm() -> &'static [u8] {
    telvirt_agent::runtimes::wasm::example_modules()
        .into_iter()
        .find_map(|(name, wasm)| (name == "firewall").then_some(wasm))
        .expect("the example firewall is built in")
}

/// `sha256:<hex>` of the example firewall: what a descriptor names once it is uploaded.
pub fn firewall_ref() -> String {
    format!("sha256:{}", sha256_hex(firewall_wasm()))
}

/// The node's verifier with the built-in security policy.
pub struct DefaultVerifier;

impl ModuleVerifier for DefaultVerifier {
    fn verify(&self, bytes: &[u8], domain: &str) -> Result<ModuleInfo, Vec<String>> {
        telvirt_agent::runtimes::wasm::verify_module(bytes, domain, &Default::default())
    }
}

/// A wasm VNF running the uploaded example firewall (every authority of `Node` uploads it).
pub fn wasm_vnf(name: &str) -> String {
    format!(
        "apiVersion: telvirt/v1\nkind: Vnf\nmetadata: {{ name: {name} }}\nspec:\n  runtime: wasm\n  cpu: {{ policy: dedicated, count: 1 }}\n  ports: [in, out]\n  wasm:\n    module: \"{}\"\n    limits: {{ memory: 16MiB }}\n",
        firewall_ref()
    )
}

/// The `name` of each object of a list answer, in order.
pub fn names(reply: &Reply) -> Vec<String> {
    reply
        .body
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {}", reply.body))
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_owned())
        .collect()
}

/// [`wasm_vnf`] with `labels` (YAML flow mapping body, e.g. `role: edge, zone: a`).
pub fn labelled(name: &str, labels: &str) -> String {
    wasm_vnf(name).replace(
        &format!("metadata: {{ name: {name} }}"),
        &format!("metadata: {{ name: {name}, labels: {{ {labels} }} }}"),
    )
}

/// An agent's report of `vnf` in `phase` ("running", generation 0), nothing else said.
pub fn observation(vnf: &str, phase: telvirt_model::Phase) -> telvirt_model::api::Observation {
    telvirt_model::api::Observation {
        machine: None,
        accel: None,
        resumed_at_us: None,
        vnf: vnf.parse().expect("a VNF name"),
        phase,
        reason: "running".into(),
        generation: 0,
        replication: None,
        active_lost: None,
        arrival_failed: false,
    }
}

/// A 4-core host with an agent (no runtimes: placement does not need them).
pub fn host_record(name: &str) -> HostRecord {
    HostRecord {
        qemu_machines: Vec::new(),
        accel: None,
        cpu: None,
        spec: HostSpec {
            name: name.into(),
            topology: Some(TopologySpec {
                sockets: 1,
                cores_per_socket: 4,
                threads_per_core: 1,
                numa_nodes_per_socket: 1,
                memory_per_node: None,
            }),
            shared: "0".parse().unwrap(),
            ..HostSpec::default()
        },
        memory_bytes: 1 << 30,
        hugepages: Vec::new(),
        runtimes: Vec::new(),
        agent: true,
        tunnel: None,
        qemu: None,
    }
}
