//! No drift between the deployment files and the supervisor: every `WASMBOX_*` variable the
//! manifests and the Dockerfile set is one `wasmbox` understands (read from the built
//! binary's `--help`), container ports match the listen addresses, probes use the health
//! endpoints on a served port, Services and autoscalers point at what exists, every
//! volume claim is defined, and a container that runs as root does not point the
//! supervisor at directories the image gives its unprivileged user (which a root
//! supervisor refuses to trust).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use wasmbox_integration::{repo_root, wasmbox_command};
use yaml_rust2::{Yaml, YamlLoader};

/// Variables outside the `WASMBOX_` prefix the supervisor also reads.
const OTHER_SETTINGS: [&str; 4] = ["LOG_FORMAT", "LOG_LEVEL", "WASM_RUNTIME", "ENABLE_CGROUPS"];
const MANIFESTS: [&str; 5] = ["ksvc-standalone.yaml", "ksvc.yaml", "pv.yaml", "pvc.yaml", "kubernetes.yaml"];

/// The variables `wasmbox --help` lists (`[env: NAME=...]`).
fn known_settings() -> BTreeSet<String> {
    let out = wasmbox_command().arg("--help").output().expect("wasmbox --help");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    let names: BTreeSet<String> = help
        .split("[env: ")
        .skip(1)
        .map(|rest| rest.chars().take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_').collect())
        .collect();
    assert!(names.contains("WASMBOX_LISTEN") && names.len() > 40, "{names:?}");
    names
}

fn is_setting(name: &str) -> bool {
    name.starts_with("WASMBOX_") || OTHER_SETTINGS.contains(&name)
}

/// The image's defaults, from the Dockerfile's ENV lines.
fn dockerfile_env(text: &str) -> BTreeMap<String, String> {
    let joined = text.replace("\\\n", " ");
    let mut env = BTreeMap::new();
    for line in joined.lines().map(str::trim) {
        let Some(rest) = line.strip_prefix("ENV ") else { continue };
        for pair in rest.split_whitespace() {
            if let Some((k, v)) = pair.split_once('=') {
                env.insert(k.to_owned(), v.trim_matches('"').to_owned());
            }
        }
    }
    env
}

fn port_of(listen: &str) -> Option<u16> {
    listen.parse::<SocketAddr>().ok().map(|a| a.port())
}

fn str_of(y: &Yaml) -> Option<String> {
    match y {
        Yaml::String(s) => Some(s.clone()),
        Yaml::Integer(i) => Some(i.to_string()),
        _ => None,
    }
}

/// Every mapping in a document, depth first.
fn hashes<'a>(y: &'a Yaml, out: &mut Vec<&'a Yaml>) {
    match y {
        Yaml::Hash(h) => {
            out.push(y);
            for v in h.values() {
                hashes(v, out);
            }
        }
        Yaml::Array(a) => a.iter().for_each(|v| hashes(v, out)),
        _ => {}
    }
}

/// What the image gives the manifests: its ENV defaults, and the directories it hands to
/// its unprivileged user (`chown` in the Dockerfile).
struct Image {
    env: BTreeMap<String, String>,
    user_dirs: BTreeSet<String>,
}

impl Image {
    fn from_dockerfile(text: &str) -> Image {
        let joined = text.replace("\\\n", " ");
        let user_dirs = joined
            .split("chown ")
            .skip(1)
            .flat_map(|rest| {
                rest.split("&&")
                    .next()
                    .unwrap_or_default()
                    .split_whitespace()
                    .skip(1)
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .filter(|d| d.starts_with('/'))
            .collect();
        Image { env: dockerfile_env(text), user_dirs }
    }
}

/// Checks one container spec; returns the problems found.
fn check_container(file: &str, c: &Yaml, known: &BTreeSet<String>, image: &Image) -> Vec<String> {
    let image_env = &image.env;
    let mut problems = Vec::new();
    let mut env = image_env.clone();
    for var in c["env"].as_vec().into_iter().flatten() {
        let Some(name) = var["name"].as_str() else { continue };
        if is_setting(name) && !known.contains(name) {
            problems.push(format!("{file}: sets {name}, which wasmbox does not know"));
        }
        if let Some(value) = str_of(&var["value"]) {
            env.insert(name.to_owned(), value);
        }
    }
    // The cache and state directories must belong to the supervisor's own uid: as root it
    // refuses the image's directories, which uid 10001 owns.
    if c["securityContext"]["runAsUser"].as_i64() == Some(0) {
        for setting in ["WASMBOX_CACHE_DIR", "WASMBOX_STATE_DIR"] {
            if let Some(dir) = env.get(setting).filter(|d| image.user_dirs.contains(*d)) {
                problems.push(format!(
                    "{file}: runs as root with {setting}={dir}, a directory the image gives its unprivileged user"
                ));
            }
        }
    }
    let listen = env.get("WASMBOX_LISTEN").and_then(|l| port_of(l));
    let health = env.get("WASMBOX_HEALTH_LISTEN").and_then(|l| port_of(l));
    let Some(listen) = listen else {
        problems.push(format!("{file}: no usable WASMBOX_LISTEN"));
        return problems;
    };
    let served: BTreeSet<u16> = [Some(listen), health].into_iter().flatten().collect();
    let mut named = BTreeMap::new();
    for p in c["ports"].as_vec().into_iter().flatten() {
        let port = p["containerPort"].as_i64().unwrap_or(-1);
        if !served.iter().any(|s| i64::from(*s) == port) {
            problems.push(format!("{file}: containerPort {port} is not a port wasmbox listens on ({served:?})"));
        }
        if let Some(name) = p["name"].as_str() {
            named.insert(name.to_owned(), port);
        }
    }
    for (probe, path) in [("readinessProbe", "/ready"), ("livenessProbe", "/healthz"), ("startupProbe", "/healthz")] {
        let get = &c[probe]["httpGet"];
        if get.is_badvalue() {
            continue;
        }
        if get["path"].as_str() != Some(path) {
            problems.push(format!("{file}: {probe} uses {:?}, not {path}", get["path"]));
        }
        let port = match &get["port"] {
            Yaml::Integer(i) => *i,
            Yaml::String(name) => *named.get(name).unwrap_or(&-1),
            _ => -1,
        };
        if !served.iter().any(|s| i64::from(*s) == port) {
            problems.push(format!("{file}: {probe} probes port {port}, where wasmbox does not listen"));
        }
    }
    problems
}

/// Checks one manifest file's documents.
fn check_manifest(file: &str, text: &str, known: &BTreeSet<String>, image: &Image) -> Vec<String> {
    let docs = match YamlLoader::load_from_str(text) {
        Ok(docs) => docs,
        Err(e) => return vec![format!("{file}: not YAML: {e}")],
    };
    let mut problems = Vec::new();
    let mut deployments = BTreeSet::new();
    let mut port_names = BTreeSet::new();
    for doc in &docs {
        let mut all = Vec::new();
        hashes(doc, &mut all);
        for c in all.iter().filter(|h| !h["image"].is_badvalue()) {
            problems.extend(check_container(file, c, known, image));
            for p in c["ports"].as_vec().into_iter().flatten() {
                if let Some(name) = p["name"].as_str() {
                    port_names.insert(name.to_owned());
                }
                port_names.insert(p["containerPort"].as_i64().unwrap_or(-1).to_string());
            }
        }
        if doc["kind"].as_str() == Some("Deployment") {
            deployments.insert(doc["metadata"]["name"].as_str().unwrap_or_default().to_owned());
        }
        for h in &all {
            if let Some(port) = str_of(&h["prometheus.io/port"]) {
                if !port_names.contains(&port) {
                    problems.push(format!("{file}: prometheus.io/port {port} is not a container port"));
                }
            }
        }
    }
    for doc in &docs {
        match doc["kind"].as_str() {
            Some("Service") if doc["apiVersion"].as_str() == Some("v1") => {
                for p in doc["spec"]["ports"].as_vec().into_iter().flatten() {
                    let target = str_of(&p["targetPort"]).unwrap_or_default();
                    if !port_names.contains(&target) {
                        problems.push(format!("{file}: Service targetPort {target} is no container port"));
                    }
                }
            }
            Some("HorizontalPodAutoscaler") => {
                let target = doc["spec"]["scaleTargetRef"]["name"].as_str().unwrap_or_default();
                if !deployments.contains(target) {
                    problems.push(format!("{file}: the autoscaler scales {target:?}, which is not defined here"));
                }
            }
            _ => {}
        }
    }
    problems
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo_root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn deployment_files_match_what_the_supervisor_understands() {
    let known = known_settings();
    let dockerfile = read("Dockerfile");
    let image = Image::from_dockerfile(&dockerfile);
    let image_env = &image.env;
    for dir in ["/var/cache/wasmbox", "/var/lib/wasmbox"] {
        assert!(image.user_dirs.contains(dir), "the Dockerfile no longer chowns {dir}: {:?}", image.user_dirs);
    }
    let mut problems = Vec::new();

    // The Dockerfile: its variables, port, volume and health check.
    for name in image_env.keys().filter(|n| is_setting(n)) {
        if !known.contains(name) {
            problems.push(format!("Dockerfile: sets {name}, which wasmbox does not know"));
        }
    }
    let listen = image_env.get("WASMBOX_LISTEN").and_then(|l| port_of(l)).expect("the image sets WASMBOX_LISTEN");
    if !dockerfile.lines().any(|l| l.trim() == format!("EXPOSE {listen}")) {
        problems.push(format!("Dockerfile: does not EXPOSE the listen port {listen}"));
    }
    if !dockerfile.contains(&format!("/dev/tcp/127.0.0.1/{listen}")) || !dockerfile.contains("GET /healthz") {
        problems.push("Dockerfile: the HEALTHCHECK does not probe /healthz on the listen port".into());
    }
    let functions = image_env.get("WASMBOX_FUNCTIONS_DIR").expect("the image sets WASMBOX_FUNCTIONS_DIR");
    if !dockerfile.contains(&format!("VOLUME [\"{functions}\"]")) {
        problems.push(format!("Dockerfile: {functions} is not a VOLUME"));
    }
    let state = image_env.get("WASMBOX_STATE_DIR").expect("the image sets WASMBOX_STATE_DIR");
    if !dockerfile.contains(&format!("VOLUME [\"{state}\"]")) {
        problems.push(format!("Dockerfile: the session state directory {state} is not a VOLUME"));
    }
    for stage in ["AS wasmtime", "AS wasmedge"] {
        if !dockerfile.contains(stage) {
            problems.push(format!("Dockerfile: no stage {stage}"));
        }
    }
    for engine in ["wasmtime", "wasmedge"] {
        if !dockerfile.contains(&format!("WASMBOX_ENGINE={engine}")) {
            problems.push(format!("Dockerfile: no image sets WASMBOX_ENGINE={engine}"));
        }
    }
    // The default command is a subcommand wasmbox has.
    assert!(dockerfile.contains("CMD [\"serve\"]"));
    assert!(wasmbox_command().args(["serve", "--help"]).output().unwrap().status.success());

    // The manifests.
    let mut claims_used = BTreeSet::new();
    for file in MANIFESTS {
        let text = read(&format!("deployment/{file}"));
        problems.extend(check_manifest(file, &text, &known, &image));
        for line in text.lines() {
            if let Some(claim) = line.trim().strip_prefix("claimName: ") {
                claims_used.insert(claim.to_owned());
            }
        }
    }
    // Every claim mounted is defined, and binds a volume by its labels.
    let pvcs = YamlLoader::load_from_str(&read("deployment/pvc.yaml")).unwrap();
    let pvs = YamlLoader::load_from_str(&read("deployment/pv.yaml")).unwrap();
    for claim in &claims_used {
        let Some(pvc) = pvcs.iter().find(|d| d["metadata"]["name"].as_str() == Some(claim.as_str())) else {
            problems.push(format!("claim {claim} is mounted but pvc.yaml does not define it"));
            continue;
        };
        let selector = pvc["spec"]["selector"]["matchLabels"].as_hash().cloned().unwrap_or_default();
        let binds =
            pvs.iter().any(|pv| selector.iter().all(|(k, v)| pv["metadata"]["labels"][k.as_str().unwrap_or("")] == *v));
        if !binds {
            problems.push(format!("claim {claim}: no volume in pv.yaml matches its selector"));
        }
    }
    assert!(problems.is_empty(), "deployment files drifted:\n{}", problems.join("\n"));
    // Each file is explained in deployment/README.md.
    let readme = read("deployment/README.md");
    for file in MANIFESTS {
        assert!(readme.contains(&format!("`{file}`")), "deployment/README.md does not explain {file}");
    }
}

#[test]
fn the_drift_check_catches_what_it_is_for() {
    let known = known_settings();
    let image = Image::from_dockerfile(
        "RUN useradd x \\\n && chown wasmbox:wasmbox /var/cache/wasmbox /var/lib/wasmbox \\\n && chmod 700 x\nENV WASMBOX_LISTEN=0.0.0.0:8095 \\\n    LOG_FORMAT=json \\\n    WASMBOX_STATE_DIR=/var/lib/wasmbox\n",
    );
    assert_eq!(image.env["LOG_FORMAT"], "json");
    assert_eq!(image.user_dirs, ["/var/cache/wasmbox", "/var/lib/wasmbox"].map(String::from).into());
    let bad = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: x}
spec:
  template:
    spec:
      containers:
        - name: x
          image: i
          ports: [{name: http, containerPort: 8080}]
          env:
            - {name: WASMBOX_WORKER, value: "4"}
            - {name: WASMBOX_HEALTH_LISTEN, value: "0.0.0.0:8096"}
            - {name: WASMBOX_CACHE_DIR, value: /var/cache/wasmbox}
          securityContext: {runAsUser: 0}
          readinessProbe: {httpGet: {path: /health, port: 8096}}
          livenessProbe: {httpGet: {path: /healthz, port: 9999}}
---
apiVersion: v1
kind: Service
metadata: {name: x}
spec: {ports: [{port: 80, targetPort: web}]}
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata: {name: x}
spec: {scaleTargetRef: {name: y}}
"#;
    let problems = check_manifest("bad.yaml", bad, &known, &image).join("\n");
    for expected in [
        "sets WASMBOX_WORKER, which wasmbox does not know",
        "containerPort 8080 is not a port wasmbox listens on",
        "readinessProbe uses",
        "livenessProbe probes port 9999",
        "Service targetPort web",
        "scales \"y\"",
        "runs as root with WASMBOX_CACHE_DIR=/var/cache/wasmbox",
        "runs as root with WASMBOX_STATE_DIR=/var/lib/wasmbox",
    ] {
        assert!(problems.contains(expected), "missing {expected:?} in:\n{problems}");
    }
}
