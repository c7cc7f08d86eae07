//! The deployment files, checked as far as this machine can: the example configs against
//! the real binaries, the Kubernetes and Compose YAML parsed (python3-yaml) and checked for
//! what matters, the Dockerfile's stages, and the systemd units with `systemd-analyze
//! verify`.

use std::path::{Path, PathBuf};
use std::process::Command;

use relay_tests::procs::{binary, TempDir};

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file)
}

/// Long flags of `bin --help`, as config keys.
fn flags(bin: &str) -> Vec<String> {
    let out = Command::new(binary(bin)).arg("--help").output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("--"))
        .map(|l| l.split([' ', ',', '=']).next().unwrap().replace('-', "_"))
        .filter(|f| !["help", "version", "config"].contains(&f.as_str()))
        .collect()
}

fn keys_documented(file: &str, bin: &str) {
    let text = std::fs::read_to_string(deploy(file)).unwrap();
    let keys: Vec<String> = text
        .lines()
        .map(|l| l.trim_start_matches(['#', ' ']))
        .filter_map(|l| l.split_once(" = ").map(|(k, _)| k.to_owned()))
        .collect();
    let flags = flags(bin);
    assert!(flags.len() > 20, "{flags:?}");
    for f in flags {
        assert!(keys.contains(&f), "{file} does not document `{f}`");
    }
}

/// `relay-server check-config FILE` with `env` succeeds.
fn check_config(file: &Path, env: &[(&str, &std::ffi::OsStr)]) {
    let out = Command::new(binary("relay-server"))
        .arg("check-config")
        .arg(file)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every YAML document of `file`, as JSON (through python3-yaml).
fn yaml(file: &Path) -> Vec<serde_json::Value> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))",
        ])
        .arg(file)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn example_configs_document_every_flag_and_check_out() {
    keys_documented("relay.example.toml", "relay-server");
    keys_documented("agent.example.toml", "relay-client");
    let dir = TempDir::new("deploy-cfg");
    let key = dir.0.join("link.key");
    std::fs::write(&key, "k".repeat(40)).unwrap();
    check_config(
        &deploy("relay.example.toml"),
        &[("RELAY_LINK_SECRET_FILE", key.as_os_str())],
    );
    // The agent parses its file before anything else (every value through its flag's parser).
    let out = Command::new(binary("relay-client"))
        .args(["--config"])
        .arg(deploy("agent.example.toml"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn kubernetes_manifests_wire_probes_drain_and_config() {
    let docs = yaml(&deploy("k8s/relay-server.yaml"));
    let kind = |k: &str| {
        docs.iter()
            .find(|d| d["kind"] == k)
            .unwrap_or_else(|| panic!("no {k}"))
    };
    let deployment = kind("Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let ports: Vec<&str> = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(ports, ["public", "agents", "admin"]);
    assert_eq!(
        kind("ServiceMonitor")["spec"]["endpoints"][0]["path"],
        "/metrics"
    );

    // The config the ConfigMap carries checks out, and the grace period outlasts the drain.
    let toml = kind("ConfigMap")["data"]["relay.toml"].as_str().unwrap();
    let dir = TempDir::new("deploy-k8s");
    let cfg = dir.0.join("relay.toml");
    std::fs::write(&cfg, toml).unwrap();
    let (agents, users) = (dir.0.join("agents"), dir.0.join("users"));
    let secret = &kind("Secret")["stringData"];
    std::fs::write(&agents, secret["agent-tokens"].as_str().unwrap()).unwrap();
    std::fs::write(&users, secret["user-tokens"].as_str().unwrap()).unwrap();
    check_config(
        &cfg,
        &[
            ("RELAY_AGENT_TOKEN_FILE", agents.as_os_str()),
            ("RELAY_USER_TOKEN_FILE", users.as_os_str()),
        ],
    );
    let drain: u64 = toml
        .lines()
        .find_map(|l| l.trim().strip_prefix("drain_timeout = \""))
        .and_then(|v| v.trim_end_matches("s\"").parse().ok())
        .unwrap();
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(grace > drain, "grace {grace} s <= drain {drain} s");

    let agent = yaml(&deploy("k8s/relay-client.yaml"));
    let pod =
        &agent.iter().find(|d| d["kind"] == "Deployment").unwrap()["spec"]["template"]["spec"];
    assert_eq!(
        pod["containers"][0]["readinessProbe"]["httpGet"]["path"],
        "/readyz"
    );
}

#[test]
fn the_cluster_manifest_runs_replicas_on_redis_with_an_internal_headless_service() {
    let docs = yaml(&deploy("k8s/relay-cluster.yaml"));
    let named = |k: &str, n: &str| {
        docs.iter()
            .find(|d| d["kind"] == k && d["metadata"]["name"] == n)
            .unwrap_or_else(|| panic!("no {k} {n}"))
    };
    let deployment = named("Deployment", "relay-cluster");
    assert!(deployment["spec"]["replicas"].as_u64().unwrap() >= 2);
    let c = &deployment["spec"]["template"]["spec"]["containers"][0];
    let env = c["env"].as_array().unwrap();
    let advertise = env
        .iter()
        .find(|e| e["name"] == "RELAY_ADVERTISE_URL")
        .expect("the advertised URL comes from the pod");
    assert_eq!(advertise["value"], "http://$(POD_IP):8090");
    assert!(c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == "cluster" && p["containerPort"] == 8090));
    let internal = named("Service", "relay-cluster-internal");
    assert_eq!(internal["spec"]["clusterIP"], "None", "headless");
    assert_eq!(internal["spec"]["ports"][0]["targetPort"], "cluster");
    let public = named("Service", "relay-cluster");
    assert!(
        public["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["name"] != "cluster"),
        "the internal listener is not on the public Service"
    );
    named("Service", "relay-redis");

    // Its configuration passes the binary's own check, secrets from the Secret.
    let toml = named("ConfigMap", "relay-cluster")["data"]["relay.toml"]
        .as_str()
        .unwrap();
    assert!(toml.contains("cluster_redis = \"redis://relay-redis:6379\""));
    let dir = TempDir::new("deploy-cluster");
    let cfg = dir.0.join("relay.toml");
    std::fs::write(&cfg, toml).unwrap();
    let secret = &named("Secret", "relay-cluster-secrets")["stringData"];
    let (agents, users, cluster) = (
        dir.0.join("agents"),
        dir.0.join("users"),
        dir.0.join("cluster"),
    );
    std::fs::write(&agents, secret["agent-tokens"].as_str().unwrap()).unwrap();
    std::fs::write(&users, secret["user-tokens"].as_str().unwrap()).unwrap();
    std::fs::write(&cluster, secret["cluster-secret"].as_str().unwrap()).unwrap();
    check_config(
        &cfg,
        &[
            ("RELAY_AGENT_TOKEN_FILE", agents.as_os_str()),
            ("RELAY_USER_TOKEN_FILE", users.as_os_str()),
            ("RELAY_CLUSTER_SECRET_FILE", cluster.as_os_str()),
            ("RELAY_ADVERTISE_URL", "http://10.1.2.3:8090".as_ref()),
        ],
    );
}

#[test]
fn compose_and_dockerfile_agree() {
    let compose = yaml(&deploy("docker-compose.yml"));
    let services = compose[0]["services"].as_object().unwrap();
    for s in ["relay-server", "relay-client", "demo-backend"] {
        assert!(services.contains_key(s), "compose lacks {s}");
    }
    let dockerfile = std::fs::read_to_string(deploy("Dockerfile")).unwrap();
    // Every instruction is one Docker knows; every stage a COPY --from or compose names
    // exists; every final stage runs as a non-root user.
    let known = [
        "FROM",
        "WORKDIR",
        "COPY",
        "RUN",
        "USER",
        "EXPOSE",
        "ENV",
        "ENTRYPOINT",
        "CMD",
        "ARG",
        "LABEL",
    ];
    let mut stages = Vec::new();
    let mut users = std::collections::HashMap::new();
    let mut current = String::new();
    let mut continued = false;
    for line in dockerfile.lines() {
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        if continued {
            continued = l.ends_with('\\');
            continue;
        }
        continued = l.ends_with('\\');
        let word = l.split_whitespace().next().unwrap();
        assert!(known.contains(&word), "unknown instruction {word:?}");
        if word == "FROM" {
            current = l.rsplit(" AS ").next().unwrap().to_owned();
            stages.push(current.clone());
        }
        if let Some(from) = l.strip_prefix("COPY --from=") {
            let stage = from.split_whitespace().next().unwrap();
            assert!(
                stages.iter().any(|s| s == stage),
                "COPY from unknown stage {stage}"
            );
        }
        if let Some(u) = l.strip_prefix("USER ") {
            users.insert(current.clone(), u.to_owned());
        }
    }
    for svc in ["relay-server", "relay-client"] {
        let target = services[svc]["build"]["target"].as_str().unwrap();
        assert!(stages.iter().any(|s| s == target), "no stage {target}");
        let user = users.get(target).expect("a USER in the final stage");
        assert!(
            !user.starts_with("root") && !user.starts_with('0'),
            "{target} runs as {user}"
        );
    }
}

#[test]
fn systemd_units_verify() {
    let analyze = ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("systemd-analyze is not installed: run the README's test command");
    let dir = TempDir::new("deploy-systemd");
    let mut units = Vec::new();
    for (unit, bin) in [
        ("relay-server.service", "relay-server"),
        ("relay-client.service", "relay-client"),
    ] {
        let text = std::fs::read_to_string(deploy(&format!("systemd/{unit}"))).unwrap();
        for key in [
            "DynamicUser=yes",
            "ProtectSystem=strict",
            "NoNewPrivileges=yes",
            "Restart=",
        ] {
            assert!(text.contains(key), "{unit} lacks {key}");
        }
        // Verify against the binaries built here (the unit's path is the install path).
        let local = text.replace(&format!("/usr/bin/{bin}"), binary(bin).to_str().unwrap());
        let path = dir.0.join(unit);
        std::fs::write(&path, local).unwrap();
        units.push(path);
    }
    let out = Command::new(analyze)
        .arg("verify")
        .args(&units)
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
}
