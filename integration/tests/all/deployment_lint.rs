//! The deployment files linted as the platforms will read them: the Dockerfile by hadolint,
//! the Kubernetes manifests (and the pod template of each Knative Service) against the
//! Kubernetes schemas by kubernetes-validate, strictly, and the Knative Services against
//! what Knative Serving's admission accepts (its field masks and validation rules). The
//! linters come from PyPI into target/lint-tools (scripts/ensure-lint-tools).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use wasmbox_integration::repo_root;
use yaml_rust2::{Yaml, YamlLoader};

fn lint_tools() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let out =
            Command::new(repo_root().join("scripts/ensure-lint-tools")).output().expect("scripts/ensure-lint-tools");
        assert!(out.status.success(), "scripts/ensure-lint-tools: {}", String::from_utf8_lossy(&out.stderr));
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
    .clone()
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo_root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn the_dockerfile_is_clean_under_hadolint() {
    let out = Command::new(lint_tools().join("hadolint"))
        .args(["--no-color", "Dockerfile"])
        .current_dir(repo_root())
        .output()
        .expect("hadolint");
    assert!(
        out.status.success(),
        "hadolint:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A YAML document as JSON (which is YAML too), to hand a built document to the validator.
fn json(y: &Yaml) -> serde_json::Value {
    match y {
        Yaml::Hash(h) => serde_json::Value::Object(
            h.iter().filter_map(|(k, v)| k.as_str().map(|k| (k.to_string(), json(v)))).collect(),
        ),
        Yaml::Array(a) => serde_json::Value::Array(a.iter().map(json).collect()),
        Yaml::String(s) => s.clone().into(),
        Yaml::Integer(i) => (*i).into(),
        Yaml::Real(r) => r.parse::<f64>().map_or(serde_json::Value::Null, Into::into),
        Yaml::Boolean(b) => (*b).into(),
        _ => serde_json::Value::Null,
    }
}

const KNATIVE_SERVICES: [&str; 2] = ["ksvc-standalone.yaml", "ksvc.yaml"];
/// Fields of a Knative revision template's spec that are Knative's, not the pod's.
const REVISION_FIELDS: [&str; 4] =
    ["containerConcurrency", "timeoutSeconds", "responseStartTimeoutSeconds", "idleTimeoutSeconds"];

fn validate(files: &[PathBuf]) -> (bool, String) {
    let out = Command::new(lint_tools().join("kubernetes-validate"))
        .arg("--strict")
        .args(files)
        .current_dir(repo_root())
        .output()
        .expect("kubernetes-validate");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn the_kubernetes_manifests_validate_against_the_kubernetes_schemas() {
    let root = repo_root().join("deployment");
    let files: Vec<PathBuf> = ["kubernetes.yaml", "pv.yaml", "pvc.yaml"].iter().map(|f| root.join(f)).collect();
    let (ok, text) = validate(&files);
    assert!(ok, "kubernetes-validate --strict:\n{text}");
    let passed = text.lines().filter(|l| l.contains(" passed for resource ")).count();
    assert_eq!(
        passed, 7,
        "every resource was checked (a Deployment, Service, autoscaler, 2 volumes, 2 claims):\n{text}"
    );

    // What a Knative Service's template becomes: a pod; its spec must be a valid PodSpec.
    let dir = tempfile::tempdir().unwrap();
    let mut pods = Vec::new();
    for file in KNATIVE_SERVICES {
        let doc = &YamlLoader::load_from_str(&read(&format!("deployment/{file}"))).unwrap()[0];
        let mut spec = json(&doc["spec"]["template"]["spec"]);
        let fields = spec.as_object_mut().expect("a template spec");
        for f in REVISION_FIELDS {
            fields.remove(f);
        }
        let pod = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": { "name": doc["metadata"]["name"].as_str().unwrap_or("ksvc") },
            "spec": spec,
        });
        let path = dir.path().join(file);
        std::fs::write(&path, pod.to_string()).unwrap();
        pods.push(path);
    }
    let (ok, text) = validate(&pods);
    assert!(ok, "the Knative Services' pod templates, as pods:\n{text}");
    assert_eq!(text.lines().filter(|l| l.contains(" passed for resource pod/")).count(), 2, "{text}");
}

/// The Knative feature flags a file says it needs: `Knative feature flags: a, b` in a comment.
fn declared_flags(text: &str) -> BTreeSet<String> {
    let joined: String = text.lines().filter_map(|l| l.trim().strip_prefix('#')).collect::<Vec<_>>().join(" ");
    let Some(rest) = joined.split("Knative feature flags:").nth(1) else { return BTreeSet::new() };
    rest.split_whitespace()
        .map(|w| w.trim_end_matches([',', '.']))
        .filter(|w| *w != "and")
        .take_while(|w| w.starts_with("kubernetes."))
        .map(str::to_string)
        .collect()
}

fn keys(y: &Yaml) -> Vec<String> {
    y.as_hash().map(|h| h.keys().filter_map(|k| k.as_str().map(str::to_string)).collect()).unwrap_or_default()
}

/// What Knative Serving's webhook refuses in one Service, by its field masks and rules
/// (knative.dev/serving pkg/apis/serving: fieldmask.go, k8s_validation.go).
fn knative_problems(file: &str, text: &str) -> Vec<String> {
    let flags = declared_flags(text);
    let mut problems = Vec::new();
    let need = |flag: &str, what: &str, problems: &mut Vec<String>| {
        if !flags.contains(flag) {
            problems
                .push(format!("{file}: {what} needs the Knative feature flag {flag}, which the file does not name"));
        }
    };
    let doc = &YamlLoader::load_from_str(text).unwrap()[0];
    if doc["apiVersion"].as_str() != Some("serving.knative.dev/v1") || doc["kind"].as_str() != Some("Service") {
        problems.push(format!("{file}: not a serving.knative.dev/v1 Service"));
    }
    let name = doc["metadata"]["name"].as_str().unwrap_or_default();
    let dns1035 = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !dns1035 {
        problems.push(format!("{file}: metadata.name {name:?} is not a DNS-1035 label"));
    }
    let annotations = &doc["spec"]["template"]["metadata"]["annotations"];
    let scale = |key: &str| annotations[key].as_str().map(|v| v.parse::<u32>().map_err(|_| v.to_string()));
    match (scale("autoscaling.knative.dev/min-scale"), scale("autoscaling.knative.dev/max-scale")) {
        (Some(Ok(min)), Some(Ok(max))) if max != 0 && min > max => {
            problems.push(format!("{file}: min-scale {min} above max-scale {max}"))
        }
        (Some(Err(v)), _) | (_, Some(Err(v))) => problems.push(format!("{file}: scale bound {v:?} is not a number")),
        _ => {}
    }

    let spec = &doc["spec"]["template"]["spec"];
    const POD_FIELDS: [&str; 5] =
        ["containers", "volumes", "serviceAccountName", "imagePullSecrets", "enableServiceLinks"];
    const GATED: [(&str, &str); 9] = [
        ("affinity", "kubernetes.podspec-affinity"),
        ("hostAliases", "kubernetes.podspec-hostaliases"),
        ("nodeSelector", "kubernetes.podspec-nodeselector"),
        ("runtimeClassName", "kubernetes.podspec-runtimeclassname"),
        ("tolerations", "kubernetes.podspec-tolerations"),
        ("securityContext", "kubernetes.podspec-securitycontext"),
        ("priorityClassName", "kubernetes.podspec-priorityclassname"),
        ("schedulerName", "kubernetes.podspec-schedulername"),
        ("initContainers", "kubernetes.podspec-init-containers"),
    ];
    for key in keys(spec) {
        if POD_FIELDS.contains(&key.as_str()) || REVISION_FIELDS.contains(&key.as_str()) {
            continue;
        }
        match GATED.iter().find(|(f, _)| *f == key) {
            Some((_, flag)) => need(flag, &format!("spec.{key}"), &mut problems),
            None => problems.push(format!("{file}: Knative does not allow the pod field {key}")),
        }
    }
    if let Some(cc) = spec["containerConcurrency"].as_i64() {
        if !(0..=1000).contains(&cc) {
            problems.push(format!("{file}: containerConcurrency {cc} outside 0..=1000"));
        }
    }
    if let Some(t) = spec["timeoutSeconds"].as_i64() {
        // max-revision-timeout-seconds' default.
        if !(1..=600).contains(&t) {
            problems.push(format!("{file}: timeoutSeconds {t} outside 1..=600"));
        }
    }

    let containers = spec["containers"].as_vec().cloned().unwrap_or_default();
    if containers.len() != 1 {
        problems.push(format!("{file}: {} containers; these Services serve from exactly one", containers.len()));
    }
    const CONTAINER_FIELDS: [&str; 16] = [
        "name",
        "args",
        "command",
        "env",
        "workingDir",
        "envFrom",
        "image",
        "imagePullPolicy",
        "livenessProbe",
        "ports",
        "readinessProbe",
        "resources",
        "securityContext",
        "terminationMessagePath",
        "terminationMessagePolicy",
        "volumeMounts",
    ];
    const SECURITY_FIELDS: [&str; 5] =
        ["runAsUser", "runAsGroup", "runAsNonRoot", "readOnlyRootFilesystem", "capabilities"];
    const RESERVED_PORTS: [i64; 5] = [8012, 8013, 8022, 9090, 9091];
    const RESERVED_PATHS: [&str; 6] = ["/", "/dev", "/dev/log", "/tmp", "/var", "/var/log"];
    let volumes: Vec<&Yaml> = spec["volumes"].as_vec().map(|v| v.iter().collect()).unwrap_or_default();
    for c in &containers {
        for key in keys(c) {
            if !CONTAINER_FIELDS.contains(&key.as_str()) {
                problems.push(format!("{file}: Knative does not allow the container field {key}"));
            }
        }
        if c["image"].as_str().is_none_or(str::is_empty) {
            problems.push(format!("{file}: the container has no image"));
        }
        let ports = c["ports"].as_vec().cloned().unwrap_or_default();
        if ports.len() > 1 {
            problems.push(format!("{file}: {} ports; Knative routes to one", ports.len()));
        }
        let port = ports.first().and_then(|p| p["containerPort"].as_i64()).unwrap_or(8080);
        for p in &ports {
            if !matches!(p["name"].as_str(), None | Some("http1" | "h2c")) {
                problems.push(format!("{file}: port name {:?} is neither http1 nor h2c", p["name"].as_str()));
            }
            if RESERVED_PORTS.contains(&port) {
                problems.push(format!("{file}: port {port} is reserved by Knative's queue-proxy"));
            }
            for key in keys(p) {
                if !["containerPort", "name", "protocol"].contains(&key.as_str()) {
                    problems.push(format!("{file}: Knative does not allow the port field {key}"));
                }
            }
        }
        for probe in ["readinessProbe", "livenessProbe"] {
            for action in ["httpGet", "tcpSocket"] {
                if let Some(p) = c[probe][action]["port"].as_i64() {
                    if p != port {
                        problems.push(format!("{file}: {probe} probes port {p}, not the serving port {port}"));
                    }
                }
            }
        }
        let security = &c["securityContext"];
        for key in keys(security) {
            if !SECURITY_FIELDS.contains(&key.as_str()) {
                problems.push(format!("{file}: Knative does not allow securityContext.{key}"));
            }
        }
        if !security["capabilities"]["add"].is_badvalue() {
            need("kubernetes.containerspec-addcapabilities", "securityContext.capabilities.add", &mut problems);
        }
        for m in c["volumeMounts"].as_vec().into_iter().flatten() {
            let path = m["mountPath"].as_str().unwrap_or_default();
            if !path.starts_with('/') || RESERVED_PATHS.contains(&path) || path.contains(':') {
                problems.push(format!("{file}: volume mount path {path:?} is not allowed"));
            }
            for key in keys(m) {
                if !["name", "readOnly", "mountPath", "subPath"].contains(&key.as_str()) {
                    problems.push(format!("{file}: Knative does not allow the volume mount field {key}"));
                }
            }
            let name = m["name"].as_str().unwrap_or_default();
            let Some(volume) = volumes.iter().find(|v| v["name"].as_str() == Some(name)) else {
                problems.push(format!("{file}: volume mount {name} has no volume"));
                continue;
            };
            if !volume["persistentVolumeClaim"].is_badvalue() && m["readOnly"].as_bool() != Some(true) {
                need(
                    "kubernetes.podspec-persistent-volume-write",
                    &format!("the writable claim mount {name}"),
                    &mut problems,
                );
            }
        }
    }
    for v in &volumes {
        for key in keys(v).into_iter().filter(|k| k != "name") {
            match key.as_str() {
                "secret" | "configMap" | "projected" => {}
                "emptyDir" => need("kubernetes.podspec-emptydir", "an emptyDir volume", &mut problems),
                "persistentVolumeClaim" => {
                    need("kubernetes.podspec-persistent-volume-claim", "a persistentVolumeClaim volume", &mut problems)
                }
                other => problems.push(format!("{file}: Knative does not allow {other} volumes")),
            }
        }
    }
    problems
}

#[test]
fn the_knative_services_use_only_what_knative_accepts() {
    let mut problems = Vec::new();
    for file in KNATIVE_SERVICES {
        problems.extend(knative_problems(file, &read(&format!("deployment/{file}"))));
    }
    assert!(problems.is_empty(), "Knative would refuse:\n{}", problems.join("\n"));
}

/// The check itself catches what Knative refuses: a privileged container, a hostPath
/// volume, a second port, a capability or claim without its feature flag.
#[test]
fn the_knative_check_refuses_what_knative_refuses() {
    let bad = r#"# Knative feature flags: kubernetes.podspec-persistent-volume-claim.
apiVersion: serving.knative.dev/v1
kind: Service
metadata:
  name: Bad_Name
spec:
  template:
    spec:
      containerConcurrency: 5000
      hostNetwork: true
      containers:
        - image: example/wasmbox
          stdin: true
          ports:
            - containerPort: 8012
              hostPort: 80
            - containerPort: 8096
          securityContext:
            privileged: true
            capabilities:
              add: [SYS_ADMIN]
          volumeMounts:
            - name: claim
              mountPath: /var
            - name: host
              mountPath: /host
      volumes:
        - name: claim
          persistentVolumeClaim:
            claimName: c
        - name: host
          hostPath:
            path: /
"#;
    let problems = knative_problems("bad.yaml", bad).join("\n");
    for expected in [
        "not a DNS-1035 label",
        "containerConcurrency 5000",
        "pod field hostNetwork",
        "container field stdin",
        "2 ports",
        "reserved by Knative's queue-proxy",
        "port field hostPort",
        "securityContext.privileged",
        "kubernetes.containerspec-addcapabilities",
        "mount path \"/var\"",
        "kubernetes.podspec-persistent-volume-write",
        "hostPath volumes",
    ] {
        assert!(problems.contains(expected), "{expected:?} not among:\n{problems}");
    }
    assert!(
        !problems.contains("needs the Knative feature flag kubernetes.podspec-persistent-volume-claim"),
        "{problems}"
    );
}
