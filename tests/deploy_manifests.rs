//! The Kubernetes manifests of `deploy/k8s`, checked without a cluster.
//!
//! Every overlay renders alike with each kustomize on this machine (`kubectl kustomize`,
//! and the standalone `kustomize` that `.ci/run` installs) and passes
//! `kubernetes-validate --strict`. Then the cpu overlay, configured the way docs/deploy.md
//! tells a user to (an overlay of their own that sets `DND_STORE`, the example Secrets
//! filled in), runs on loopback: every pod of its Deployments becomes a `dnd` process with
//! exactly its container's args and environment, resolved as the kubelet resolves them
//! (ConfigMaps, Secrets, field references, service links, `$(VAR)`), and the example Job
//! submits a job and watches it to the end. So the manifests cannot drift from the CLI.
//!
//! What stands in for the cluster, and nothing else is changed:
//! - a pod's network namespace: its own loopback address (127.x.y.z), so `0.0.0.0:PORT` in
//!   its environment becomes that address, and a Service name becomes the address of the
//!   pod it selects, on the container port its `targetPort` names;
//! - a pod's volumes: directories (Secrets and ConfigMaps written out as files), so a path
//!   under a `mountPath` becomes the same path under that directory;
//! - a pod's read-only root filesystem: an empty directory as its working directory and
//!   `$HOME`, which must still be empty when the pod is deleted;
//! - probes: run by this test, within the budget each probe gives (`periodSeconds` ×
//!   `failureThreshold`);
//! - the bucket: `moto_server` on loopback.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Value, json};

use dnd_store::results::DescriptionRow;
use dnd_store::{batches_rows, read_parquet};
use dnd_tests::{Proc, S3Server, dnd_binary, http_get, repo, skip_outside_ci};

/// The Kubernetes release the manifests are validated against (current in 2026).
const KUBERNETES_VERSION: &str = "1.37.0";
/// The longest this test waits for any one thing.
const PATIENCE: Duration = Duration::from_secs(600);
/// The PATH of the image's base (debian:bookworm-slim).
const IMAGE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The documents of a multi-document YAML stream, as JSON values.
fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| {
            serde_json::to_value(serde_yaml::Value::deserialize(doc).expect("valid YAML"))
                .expect("YAML maps to JSON")
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn read_documents(path: &Path) -> Vec<Value> {
    documents(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

fn named<'a>(docs: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    docs.iter().find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("expected a string, got {v}"))
}

/// The kustomize renderers on this machine, as command lines.
fn renderers() -> Vec<[&'static str; 2]> {
    [["kubectl", "kustomize"], ["kustomize", "build"]]
        .into_iter()
        .filter(|[bin, _]| {
            Command::new(bin)
                .arg("--help")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect()
}

/// `dir` rendered by every kustomize here, which must agree; None (a skip) outside CI
/// when there is none.
fn render(dir: &Path) -> Option<String> {
    let renderers = renderers();
    if renderers.is_empty() {
        return skip_outside_ci(
            "no kustomize here: install kubectl >= 1.24, or run `python3 .ci/install_kustomize.py DIR` and put DIR on PATH",
        );
    }
    let mut rendered: Option<(String, String)> = None;
    for [bin, sub] in renderers {
        let out = Command::new(bin).args([sub, dir.to_str().unwrap()]).output().unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(
            out.status.success(),
            "`{bin} {sub} {}` failed:\n{}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        match &rendered {
            Some((first, first_text)) => assert_eq!(
                documents(first_text),
                documents(&text),
                "`{first}` and `{bin} {sub}` render {} differently",
                dir.display()
            ),
            None => rendered = Some((format!("{bin} {sub}"), text)),
        }
    }
    rendered.map(|(_, text)| text)
}

/// `to` as a path relative to the directory `from` (kustomize refuses absolute bases).
fn relative(from: &Path, to: &Path) -> PathBuf {
    let (from, to) = (from.canonicalize().unwrap(), to.canonicalize().unwrap());
    let (from, to): (Vec<_>, Vec<_>) = (from.components().collect(), to.components().collect());
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut path: PathBuf = std::iter::repeat_n("..", from.len() - common).collect();
    path.extend(to[common..].iter());
    path
}

/// An example Secret as a user fills it in: every placeholder replaced from `values`
/// (a placeholder the test has no value for fails it, so a new one gets noticed), plus
/// `extra` keys the example documents in its comments.
fn filled_secret(
    example: &str,
    values: &BTreeMap<&str, String>,
    extra: &[(&str, String)],
) -> Value {
    let path = repo().join("deploy/k8s/examples").join(example);
    let text = std::fs::read_to_string(&path).unwrap();
    let mut secret = documents(&text).remove(0);
    assert_eq!(secret["kind"], "Secret", "{example}");
    let data = secret["stringData"]
        .as_object_mut()
        .unwrap_or_else(|| panic!("{example}: the examples use stringData"));
    for (key, value) in data.iter_mut() {
        if str_of(value).contains("REPLACE") {
            *value =
                json!(values.get(key.as_str()).unwrap_or_else(|| panic!(
                    "{example}: no test value for the placeholder {key}"
                )));
        }
    }
    for (key, value) in extra {
        assert!(text.contains(key), "{example} does not document {key}");
        data.insert(key.to_string(), json!(value));
    }
    secret
}

/// The value of `key` in a ConfigMap's `data` or a Secret's `stringData`.
fn data_of(object: &Value) -> BTreeMap<String, String> {
    let field = if object["kind"] == "Secret" { "stringData" } else { "data" };
    assert!(
        object["kind"] != "Secret" || object.get("data").is_none(),
        "Secrets with base64 `data` are not emulated"
    );
    object[field]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), str_of(v).to_string())).collect())
        .unwrap_or_default()
}

/// `$(VAR)` references expanded from `env` as the kubelet does (`$$` escapes; an unknown
/// reference stays as written).
fn expand(text: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(after) = tail.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some((name, after)) = tail.strip_prefix("$(").and_then(|t| t.split_once(')'))
        {
            match env.get(name) {
                Some(value) => out.push_str(value),
                None => out.push_str(&tail[..name.len() + 3]),
            }
            rest = after;
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// A pod of the emulated cluster.
struct Pod {
    name: String,
    ip: Ipv4Addr,
    labels: BTreeMap<String, String>,
    spec: Value,
    /// Its volumes, working directory and logs.
    dir: PathBuf,
}

impl Pod {
    fn container(&self) -> &Value {
        let containers = self.spec["containers"].as_array().unwrap();
        assert_eq!(containers.len(), 1, "{}: one container per pod", self.name);
        &containers[0]
    }

    /// The read-only root filesystem: must stay empty.
    fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }

    fn logs(&self) -> String {
        let read = |f: &str| std::fs::read_to_string(self.dir.join(f)).unwrap_or_default();
        format!(
            "--- {} stdout\n{}--- {} stderr\n{}",
            self.name,
            read("stdout"),
            self.name,
            read("stderr")
        )
    }

    /// A container port, by number or by name.
    fn port(&self, port: &Value) -> u16 {
        if let Some(n) = port.as_u64() {
            return n as u16;
        }
        let name = str_of(port);
        let ports = self.container()["ports"].as_array().cloned().unwrap_or_default();
        let found = ports
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("{}: no container port named {name}", self.name));
        found["containerPort"].as_u64().unwrap() as u16
    }

    fn selected_by(&self, selector: &Value) -> bool {
        selector.as_object().is_some_and(|s| {
            !s.is_empty()
                && s.iter().all(|(k, v)| self.labels.get(k).map(String::as_str) == v.as_str())
        })
    }
}

/// The objects of one namespace, and the pods started from them.
struct Cluster {
    objects: Vec<Value>,
    pods: Vec<Pod>,
    dir: PathBuf,
    /// The first three octets of this run's pod addresses.
    net: [u8; 3],
    runtime: tokio::runtime::Runtime,
}

impl Cluster {
    fn new(objects: Vec<Value>, dir: &Path) -> Self {
        // Pod addresses unlikely to meet another run's: 127.0.0.0/8 is all loopback.
        let pid = std::process::id();
        let net = [127, 64 + (pid % 128) as u8, 1 + (pid / 128 % 250) as u8];
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        Self { objects, pods: Vec::new(), dir: dir.to_path_buf(), net, runtime }
    }

    fn object(&self, kind: &str, name: &str) -> Option<&Value> {
        named(&self.objects, kind, name)
    }

    /// A pod from `template` (a Deployment's or Job's), with its volumes laid out.
    fn schedule(&mut self, name: &str, template: &Value) -> usize {
        let ip = Ipv4Addr::new(self.net[0], self.net[1], self.net[2], self.pods.len() as u8 + 2);
        let labels = template["metadata"]["labels"]
            .as_object()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), str_of(v).to_string())).collect())
            .unwrap_or_default();
        let dir = self.dir.join("pods").join(name);
        std::fs::create_dir_all(dir.join("rootfs")).unwrap();
        let pod = Pod { name: name.to_string(), ip, labels, spec: template["spec"].clone(), dir };
        for volume in pod.spec["volumes"].as_array().cloned().unwrap_or_default() {
            let host = pod.dir.join("volumes").join(str_of(&volume["name"]));
            std::fs::create_dir_all(&host).unwrap();
            let (kind, source, name_field) = if volume.get("secret").is_some() {
                ("Secret", &volume["secret"], "secretName")
            } else if volume.get("configMap").is_some() {
                ("ConfigMap", &volume["configMap"], "name")
            } else {
                assert!(
                    volume.get("emptyDir").is_some(),
                    "{name}: volume {volume} is not emulated"
                );
                continue;
            };
            assert!(source.get("items").is_none(), "{name}: volume items are not emulated");
            match self.object(kind, str_of(&source[name_field])) {
                Some(object) => {
                    for (file, content) in data_of(object) {
                        std::fs::write(host.join(file), content).unwrap();
                    }
                }
                None => assert!(
                    source["optional"] == true,
                    "{name} mounts {kind} {} which does not exist",
                    source[name_field]
                ),
            }
        }
        self.pods.push(pod);
        self.pods.len() - 1
    }

    /// The one pod a Service selects, and the container port its `port` targets.
    fn endpoint(&self, service: &Value, port: u16) -> (Ipv4Addr, u16) {
        let name = str_of(&service["metadata"]["name"]);
        let pods: Vec<&Pod> =
            self.pods.iter().filter(|p| p.selected_by(&service["spec"]["selector"])).collect();
        assert_eq!(pods.len(), 1, "Service {name} selects {} pods", pods.len());
        let ports = service["spec"]["ports"].as_array().unwrap();
        let entry = ports
            .iter()
            .find(|p| p["port"] == port)
            .unwrap_or_else(|| panic!("Service {name} has no port {port}"));
        let target = entry.get("targetPort").cloned().unwrap_or(json!(port));
        (pods[0].ip, pods[0].port(&target))
    }

    /// An environment value or argument as it reads inside pod `pod`'s namespaces.
    fn translate(&self, pod: &Pod, value: &str) -> String {
        let mounts = pod.container()["volumeMounts"].as_array().cloned().unwrap_or_default();
        for mount in &mounts {
            let at = str_of(&mount["mountPath"]);
            if let Some(rest) =
                value.strip_prefix(at).filter(|r| r.is_empty() || r.starts_with('/'))
            {
                let host = pod.dir.join("volumes").join(str_of(&mount["name"]));
                return format!("{}{rest}", host.display());
            }
        }
        if let Some(port) = value.strip_prefix("0.0.0.0:") {
            return format!("{}:{port}", pod.ip);
        }
        if let Some((scheme, rest)) = value.split_once("://") {
            let (authority, path) = rest
                .split_once('/')
                .map(|(a, p)| (a, format!("/{p}")))
                .unwrap_or((rest, String::new()));
            if let Some((host, port)) = authority.split_once(':') {
                // `svc`, `svc.namespace` and `svc.namespace.svc.cluster.local` all name it.
                let service = host.split('.').next().unwrap();
                if let (Some(svc), Ok(port)) =
                    (self.object("Service", service), port.parse::<u16>())
                {
                    let (ip, target) = self.endpoint(svc, port);
                    return format!("{scheme}://{ip}:{target}{path}");
                }
            }
        }
        value.to_string()
    }

    /// The environment the kubelet gives pod `pod`'s container.
    fn environment(&self, pod: &Pod) -> BTreeMap<String, String> {
        let container = pod.container();
        let mut env = BTreeMap::new();
        // Service links (enableServiceLinks defaults to true).
        if pod.spec["enableServiceLinks"] != false {
            for service in self.objects.iter().filter(|o| o["kind"] == "Service") {
                let prefix = str_of(&service["metadata"]["name"]).to_uppercase().replace('-', "_");
                let ports = service["spec"]["ports"].as_array().unwrap();
                let first = ports[0]["port"].as_u64().unwrap() as u16;
                let (ip, _) = self.endpoint(service, first);
                env.insert(format!("{prefix}_SERVICE_HOST"), ip.to_string());
                env.insert(format!("{prefix}_SERVICE_PORT"), first.to_string());
                env.insert(format!("{prefix}_PORT"), format!("tcp://{ip}:{first}"));
                for p in ports {
                    let port = p["port"].as_u64().unwrap();
                    if let Some(name) = p["name"].as_str() {
                        env.insert(
                            format!(
                                "{prefix}_SERVICE_PORT_{}",
                                name.to_uppercase().replace('-', "_")
                            ),
                            port.to_string(),
                        );
                    }
                    let link = format!("{prefix}_PORT_{port}_TCP");
                    env.insert(link.clone(), format!("tcp://{ip}:{port}"));
                    env.insert(format!("{link}_PROTO"), "tcp".into());
                    env.insert(format!("{link}_PORT"), port.to_string());
                    env.insert(format!("{link}_ADDR"), ip.to_string());
                }
            }
        }
        for source in container["envFrom"].as_array().cloned().unwrap_or_default() {
            let (kind, reference) = match (source.get("configMapRef"), source.get("secretRef")) {
                (Some(r), None) => ("ConfigMap", r),
                (None, Some(r)) => ("Secret", r),
                _ => panic!("{}: envFrom {source} is not emulated", pod.name),
            };
            let prefix = source["prefix"].as_str().unwrap_or("");
            match self.object(kind, str_of(&reference["name"])) {
                Some(object) => env
                    .extend(data_of(object).into_iter().map(|(k, v)| (format!("{prefix}{k}"), v))),
                None => assert!(
                    reference["optional"] == true,
                    "{}: {kind} {} does not exist",
                    pod.name,
                    reference["name"]
                ),
            }
        }
        for var in container["env"].as_array().cloned().unwrap_or_default() {
            let name = str_of(&var["name"]).to_string();
            let value = if let Some(v) = var.get("value") {
                expand(str_of(v), &env)
            } else if let Some(field) = var["valueFrom"].get("fieldRef") {
                match str_of(&field["fieldPath"]) {
                    "metadata.name" => pod.name.clone(),
                    "status.podIP" => pod.ip.to_string(),
                    other => panic!("{}: fieldRef {other} is not emulated", pod.name),
                }
            } else {
                let (kind, reference) = match (
                    var["valueFrom"].get("configMapKeyRef"),
                    var["valueFrom"].get("secretKeyRef"),
                ) {
                    (Some(r), None) => ("ConfigMap", r),
                    (None, Some(r)) => ("Secret", r),
                    _ => panic!("{}: env {var} is not emulated", pod.name),
                };
                let object = self.object(kind, str_of(&reference["name"])).unwrap_or_else(|| {
                    panic!("{}: {kind} {} does not exist", pod.name, reference["name"])
                });
                data_of(object).remove(str_of(&reference["key"])).unwrap_or_else(|| {
                    panic!(
                        "{}: no key {} in {kind} {}",
                        pod.name, reference["key"], reference["name"]
                    )
                })
            };
            env.insert(name, value);
        }
        let mut env: BTreeMap<String, String> =
            env.iter().map(|(k, v)| (k.clone(), self.translate(pod, v))).collect();
        // What the container runtime adds: the image's PATH, the pod's host name, and the
        // image user's home (here inside the root filesystem, which must stay untouched).
        env.entry("PATH".into()).or_insert_with(|| IMAGE_PATH.into());
        env.insert("HOSTNAME".into(), pod.name.clone());
        env.entry("HOME".into())
            .or_insert_with(|| pod.rootfs().join("nonexistent").display().to_string());
        // /tmp is a volume in our pods; elsewhere it would be the read-only root.
        let tmp = self.translate(pod, "/tmp");
        env.insert(
            "TMPDIR".into(),
            if tmp == "/tmp" { pod.rootfs().join("tmp").display().to_string() } else { tmp },
        );
        env
    }

    /// Starts pod `index`'s container: the image's entrypoint (`dnd`) with the container's
    /// args, its environment and nothing else.
    fn start(&self, index: usize) -> Proc {
        let pod = &self.pods[index];
        let container = pod.container();
        assert!(
            container.get("command").is_none(),
            "{}: `command` would replace the image's entrypoint, dnd",
            pod.name
        );
        let env = self.environment(pod);
        let args: Vec<String> = container["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| self.translate(pod, &expand(str_of(a), &env)))
            .collect();
        let child = Command::new(dnd_binary())
            .args(&args)
            .env_clear()
            .envs(&env)
            .current_dir(pod.rootfs())
            .stdout(std::fs::File::create(pod.dir.join("stdout")).unwrap())
            .stderr(std::fs::File::create(pod.dir.join("stderr")).unwrap())
            .spawn()
            .unwrap();
        Proc(child)
    }

    fn probe_passes(&self, pod: &Pod, probe: &Value) -> bool {
        if let Some(grpc) = probe.get("grpc") {
            let addr = format!("http://{}:{}", pod.ip, grpc["port"]);
            let service = grpc["service"].as_str().unwrap_or("").to_string();
            self.runtime.block_on(async move {
                use tonic_health::pb::health_check_response::ServingStatus;
                use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
                let Ok(channel) = tonic::transport::Endpoint::from_shared(addr)
                    .unwrap()
                    .connect_timeout(Duration::from_secs(2))
                    .connect()
                    .await
                else {
                    return false;
                };
                let answer = HealthClient::new(channel).check(HealthCheckRequest { service }).await;
                answer.is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32)
            })
        } else if let Some(http) = probe.get("httpGet") {
            let path = http["path"].as_str().unwrap_or("/");
            http_get(&pod.ip.to_string(), pod.port(&http["port"]), path)
                .is_some_and(|(code, _)| (200..400).contains(&code))
        } else if let Some(tcp) = probe.get("tcpSocket") {
            std::net::TcpStream::connect((pod.ip, pod.port(&tcp["port"]))).is_ok()
        } else {
            panic!("{}: probe {probe} is not emulated", pod.name)
        }
    }

    /// Waits until pod `index`'s probe `which` passes, within the budget the probe gives.
    fn wait_for_probe(&self, index: usize, process: &mut Proc, which: &str) {
        let pod = &self.pods[index];
        let probe = &pod.container()[which];
        assert!(probe.is_object(), "{} has no {which}", pod.name);
        let seconds = |field: &str, default: u64| probe[field].as_u64().unwrap_or(default);
        let budget = Duration::from_secs(
            seconds("initialDelaySeconds", 0)
                + seconds("periodSeconds", 10) * seconds("failureThreshold", 3),
        )
        .min(PATIENCE);
        let start = Instant::now();
        while !self.probe_passes(pod, probe) {
            if let Some(status) = process.0.try_wait().unwrap() {
                panic!("{} exited ({status}) before its {which} passed\n{}", pod.name, pod.logs());
            }
            assert!(
                start.elapsed() < budget,
                "{}'s {which} did not pass within {budget:?}\n{}",
                pod.name,
                pod.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Deletes pod `index`: SIGTERM, and it must exit cleanly within its grace period,
    /// having written nothing outside its volumes.
    fn delete(&self, index: usize, mut process: Proc) {
        let pod = &self.pods[index];
        let grace = pod.spec["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
        if process.0.try_wait().unwrap().is_none() {
            process.signal("-TERM");
        }
        let status = process.wait_for_exit(Duration::from_secs(grace)).unwrap_or_else(|| {
            panic!("{} outlived its {grace} s grace period\n{}", pod.name, pod.logs())
        });
        assert!(status.success(), "{} exited with {status}\n{}", pod.name, pod.logs());
        let written: Vec<_> =
            std::fs::read_dir(pod.rootfs()).unwrap().map(|e| e.unwrap().path()).collect();
        assert!(
            written.is_empty(),
            "{} wrote to its read-only root filesystem: {written:?}",
            pod.name
        );
    }
}

/// `kubernetes-validate --strict` on `files`; the kinds it has no schema for.
fn validate(files: &[PathBuf]) -> Option<Vec<String>> {
    let output = match Command::new("kubernetes-validate")
        .args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
        .args(files)
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            return skip_outside_ci(&format!(
                "kubernetes-validate: {e}; run `pip install -r tests/requirements-deploy.txt` (.ci/run does)"
            ));
        }
    };
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "kubernetes-validate --strict refused the manifests:\n{report}"
    );
    let expected: usize = files.iter().map(|f| read_documents(f).len()).sum();
    let passed = report.matches(" passed for resource ").count();
    let unknown: Vec<String> = report
        .lines()
        .filter_map(|l| l.split("Couldn't find schema for kind ").nth(1))
        .map(|r| r.split_whitespace().next().unwrap().to_string())
        .collect();
    assert_eq!(passed + unknown.len(), expected, "{report}");
    Some(unknown)
}

fn rendered_overlay(name: &str, into: &Path) -> Option<PathBuf> {
    let yaml = render(&repo().join("deploy/k8s/overlays").join(name))?;
    let path = into.join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    Some(path)
}

fn deployment_container<'a>(docs: &'a [Value], name: &str) -> &'a Value {
    &named(docs, "Deployment", name).unwrap_or_else(|| panic!("no Deployment {name}"))["spec"]["template"]
        ["spec"]["containers"][0]
}

#[test]
fn every_overlay_renders_alike_and_validates_strictly() {
    let dir = tempfile::tempdir().unwrap();
    let Some(cpu) = rendered_overlay("cpu", dir.path()) else { return };
    let Some(gpu) = rendered_overlay("gpu", dir.path()) else { return };
    let examples: Vec<PathBuf> = std::fs::read_dir(repo().join("deploy/k8s/examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let Some(unknown) = validate(&[vec![cpu.clone(), gpu.clone()], examples].concat()) else {
        return;
    };
    // Only the Prometheus Operator's and KEDA's CRDs have no schema in kubernetes-validate.
    let mut unknown = unknown;
    unknown.sort();
    assert_eq!(unknown, ["PodMonitor", "ScaledObject"]);

    // Both autoscalers scale the worker Deployment the overlays render, on the
    // coordinator's gauge of tasks not yet done; KEDA from zero.
    let examples = repo().join("deploy/k8s/examples");
    let keda = read_documents(&examples.join("autoscaling-keda.yaml")).remove(0);
    let hpa = read_documents(&examples.join("autoscaling-hpa.yaml")).remove(0);
    let rendered = read_documents(&cpu);
    for target in [&keda["spec"]["scaleTargetRef"]["name"], &hpa["spec"]["scaleTargetRef"]["name"]]
    {
        assert!(named(&rendered, "Deployment", str_of(target)).is_some(), "{target}");
    }
    assert_eq!(keda["spec"]["minReplicaCount"], 0);
    let query = str_of(&keda["spec"]["triggers"][0]["metadata"]["query"]);
    assert!(query.contains("dnd_tasks{state=~\"queued|leased\"}"), "{query}");

    // The image runs dnd as the user the pods demand.
    let dockerfile = std::fs::read_to_string(repo().join("deploy/docker/Dockerfile.cpu")).unwrap();
    assert!(dockerfile.contains("ENTRYPOINT [\"/usr/local/bin/dnd\"]"), "{dockerfile}");
    assert!(dockerfile.contains("USER 10001:10001"), "{dockerfile}");
    let (cpu, gpu) = (read_documents(&cpu), read_documents(&gpu));
    for docs in [&cpu, &gpu] {
        for deployment in docs.iter().filter(|d| d["kind"] == "Deployment") {
            let pod = &deployment["spec"]["template"]["spec"];
            assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
            assert_eq!(pod["securityContext"]["runAsUser"], 10001);
            let container = &pod["containers"][0];
            assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
            assert!(
                str_of(&container["image"]).starts_with("ghcr.io/dnd-project/dnd:"),
                "{container}"
            );
        }
    }

    // The gpu overlay differs from the cpu one only where GPUs need it.
    let (cpu_worker, gpu_worker) =
        (deployment_container(&cpu, "dnd-worker"), deployment_container(&gpu, "dnd-worker"));
    assert_eq!(cpu_worker["args"], gpu_worker["args"]);
    assert_eq!(gpu_worker["resources"]["limits"]["nvidia.com/gpu"], 1);
    assert!(cpu_worker["resources"]["limits"].get("nvidia.com/gpu").is_none());
    assert!(
        gpu_worker["env"]
            .as_array()
            .unwrap()
            .contains(&json!({"name": "DND_DEVICE", "value": "cuda:0"}))
    );
    let tolerations = &named(&gpu, "Deployment", "dnd-worker").unwrap()["spec"]["template"]["spec"]
        ["tolerations"];
    assert_eq!(tolerations[0]["key"], "nvidia.com/gpu");
    let mut cpu_coordinator = deployment_container(&cpu, "dnd-coordinator").clone();
    let mut gpu_coordinator = deployment_container(&gpu, "dnd-coordinator").clone();
    cpu_coordinator["image"] = json!("");
    gpu_coordinator["image"] = json!("");
    assert_eq!(cpu_coordinator, gpu_coordinator);
}

#[test]
fn the_cpu_overlay_runs_a_job_on_loopback_as_rendered() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3Server::start("dnd-k8s");

    // docs/deploy.md step 3: the user's overlay sets DND_STORE to their bucket.
    let user = dir.path().join("my-overlay");
    std::fs::create_dir_all(&user).unwrap();
    let base = relative(&user, &repo().join("deploy/k8s/overlays/cpu"));
    std::fs::write(
        user.join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {}\npatches:\n  - target: {{kind: ConfigMap, name: dnd-defaults}}\n    patch: |-\n      - op: replace\n        path: /data/DND_STORE\n        value: s3://dnd-k8s/dnd\n",
            base.display()
        ),
    )
    .unwrap();
    let Some(rendered) = render(&user) else { return };
    let mut objects = documents(&rendered);

    // Step 2: the Secrets, shaped as the examples; step 4: the job file as a ConfigMap.
    let token: String = (0..64)
        .map(|i| char::from_digit((i * 7 + std::process::id() as usize) as u32 % 16, 16).unwrap())
        .collect();
    objects.push(filled_secret(
        "secret-token.example.yaml",
        &BTreeMap::from([("token", token)]),
        &[],
    ));
    let credentials = BTreeMap::from([
        ("AWS_ACCESS_KEY_ID", S3Server::ACCESS_KEY.to_string()),
        ("AWS_SECRET_ACCESS_KEY", S3Server::SECRET_KEY.to_string()),
    ]);
    let s3_compatible =
        [("AWS_ENDPOINT", s3.endpoint.clone()), ("AWS_ALLOW_HTTP", "true".to_string())];
    objects.push(filled_secret("secret-object-store.example.yaml", &credentials, &s3_compatible));
    // The tiny fixture job; its models and images are where every pod can read them.
    let fixtures = format!("\"{}/tests/fixtures/", repo().display());
    let job_toml = std::fs::read_to_string(repo().join("tests/fixtures/tiny-job.toml"))
        .unwrap()
        .replace("\"tests/fixtures/", &fixtures)
        .replacen("seed = 0", "seed = 0\nname = \"k8s\"", 1);
    objects.push(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "dnd-job"}, "data": {"job.toml": job_toml}}));

    let mut cluster = Cluster::new(objects.clone(), dir.path());
    let coordinator = named(&objects, "Deployment", "dnd-coordinator").unwrap().clone();
    assert_eq!(coordinator["spec"]["replicas"], 1);
    let c = cluster.schedule("dnd-coordinator-0", &coordinator["spec"]["template"]);
    let mut coordinator_process = cluster.start(c);
    cluster.wait_for_probe(c, &mut coordinator_process, "startupProbe");
    cluster.wait_for_probe(c, &mut coordinator_process, "readinessProbe");

    let worker = named(&objects, "Deployment", "dnd-worker").unwrap().clone();
    let replicas = worker["spec"]["replicas"].as_u64().unwrap();
    assert!(replicas >= 2, "the base runs several workers");
    let mut workers = Vec::new();
    for i in 0..replicas {
        let w = cluster.schedule(&format!("dnd-worker-{i}"), &worker["spec"]["template"]);
        workers.push((w, cluster.start(w)));
    }
    for (w, process) in &mut workers {
        cluster.wait_for_probe(*w, process, "startupProbe");
        cluster.wait_for_probe(*w, process, "livenessProbe");
    }
    // The selectors that find these pods: the PDB's and the PodMonitor example's.
    let pdb = objects.iter().find(|o| o["kind"] == "PodDisruptionBudget").unwrap();
    assert!(
        workers
            .iter()
            .all(|(w, _)| cluster.pods[*w].selected_by(&pdb["spec"]["selector"]["matchLabels"]))
    );
    let monitor = read_documents(&repo().join("deploy/k8s/examples/monitoring.yaml")).remove(0);
    for pod in &cluster.pods {
        assert!(
            pod.selected_by(&monitor["spec"]["selector"]["matchLabels"]),
            "the PodMonitor misses {}",
            pod.name
        );
        let scraped = str_of(&monitor["spec"]["podMetricsEndpoints"][0]["port"]);
        let (code, body) = http_get(&pod.ip.to_string(), pod.port(&json!(scraped)), "/metrics")
            .unwrap_or_else(|| panic!("{} serves no metrics\n{}", pod.name, pod.logs()));
        assert_eq!(code, 200);
        assert!(body.contains("# TYPE dnd_"), "{}: {body}", pod.name);
        if pod.name.starts_with("dnd-coordinator") {
            // What the autoscaling examples query.
            assert!(body.contains("dnd_tasks{state=\"queued\"}"), "{}: {body}", pod.name);
        }
    }

    // The example Job submits the job and watches it to the end.
    let submit = read_documents(&repo().join("deploy/k8s/examples/submit-job.yaml")).remove(0);
    let j = cluster.schedule("dnd-submit-0", &submit["spec"]["template"]);
    let mut submit_process = cluster.start(j);
    let status = submit_process.wait_for_exit(PATIENCE);
    let logs = cluster.pods.iter().map(Pod::logs).collect::<Vec<_>>().join("\n");
    let status = status.unwrap_or_else(|| panic!("the submit Job did not finish\n{logs}"));
    assert!(status.success(), "the submit Job failed: {status}\n{logs}");

    // The results are in the bucket, and the workers are the pods, by name.
    let job = s3.location("dnd/jobs/k8s");
    cluster.runtime.block_on(async {
        let rows: Vec<DescriptionRow> = batches_rows(
            "descriptions",
            &read_parquet(&job, "results/descriptions.parquet").await.unwrap(),
        )
        .unwrap();
        assert_eq!(rows.len(), 5, "{rows:?}");
        assert!(rows.iter().all(|r| r.status == "ok"), "{rows:?}");
        let mut workers_seen = std::collections::BTreeSet::new();
        for file in job.list_files("events").await.unwrap() {
            let text = job.get(&format!("events/{file}")).await.unwrap();
            for line in String::from_utf8(text.to_vec()).unwrap().lines() {
                let event: Value = serde_json::from_str(line).unwrap();
                if let Some(worker) = event["worker"].as_str().filter(|w| !w.is_empty()) {
                    workers_seen.insert(worker.to_string());
                }
            }
        }
        assert!(
            !workers_seen.is_empty() && workers_seen.iter().all(|w| w.starts_with("dnd-worker-")),
            "{workers_seen:?}"
        );
    });

    // Deleting the pods: each stops on SIGTERM within its grace period.
    cluster.delete(j, submit_process);
    for (w, process) in workers {
        cluster.delete(w, process);
    }
    cluster.delete(c, coordinator_process);
}
