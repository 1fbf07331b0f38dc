//! deploy/ checked against the code: no container engine runs here, so the manifests,
//! the Dockerfile and the systemd units are parsed and every config key, port, path and
//! probe they name is checked against what the server and router really read.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use chatvault::config::Config;
use chatvault::router::RouterConfig;
use yaml_rust2::{Yaml, YamlLoader};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const BINARY: &str = "/usr/local/bin/chatvault";

fn read(rel: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn docs(rel: &str) -> Vec<Yaml> {
    YamlLoader::load_from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn kind<'a>(docs: &'a [Yaml], kind: &str) -> &'a Yaml {
    docs.iter().find(|d| d["kind"].as_str() == Some(kind)).unwrap_or_else(|| panic!("no {kind}"))
}

fn s(y: &Yaml) -> &str {
    y.as_str().unwrap_or_else(|| panic!("not a string: {y:?}"))
}

fn list(y: &Yaml) -> &[Yaml] {
    y.as_vec().map(Vec::as_slice).unwrap_or(&[])
}

fn strings(y: &Yaml) -> Vec<&str> {
    list(y).iter().map(s).collect()
}

fn named<'a>(items: &'a Yaml, name: &str) -> &'a Yaml {
    list(items).iter().find(|i| i["name"].as_str() == Some(name)).unwrap_or_else(|| panic!("nothing named {name}"))
}

fn port(container: &Yaml, name: &str) -> u16 {
    named(&container["ports"], name)["containerPort"].as_i64().unwrap() as u16
}

/// The mount path of volume `volume` in `container`.
fn mount(container: &Yaml, volume: &str) -> PathBuf {
    PathBuf::from(s(&named(&container["volumeMounts"], volume)["mountPath"]))
}

/// A pod's hardening and a container's budget, as the issue asks for both.
fn assert_locked_down(pod: &Yaml, containers: &[&Yaml]) {
    let ctx = &pod["securityContext"];
    assert_eq!(ctx["runAsNonRoot"].as_bool(), Some(true));
    assert!(ctx["runAsUser"].as_i64().unwrap() > 0);
    for c in containers {
        let sc = &c["securityContext"];
        assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true), "{:?}", c["name"]);
        assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
        assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    }
    let main = containers[containers.len() - 1];
    for (which, what) in [("requests", "cpu"), ("requests", "memory"), ("limits", "cpu"), ("limits", "memory")] {
        assert!(!main["resources"][which][what].is_badvalue(), "resources.{which}.{what}");
    }
}

/// Readiness and liveness ask grpc.health.v1 on `port` (loopback) with the binary itself.
fn assert_probes(container: &Yaml, port: u16) {
    for probe in ["readinessProbe", "livenessProbe"] {
        let cmd = strings(&container[probe]["exec"]["command"]);
        assert_eq!(cmd, [BINARY, "health", "--server", &format!("http://127.0.0.1:{port}")], "{probe}");
    }
}

/// The files of a secret volume are copied, 0600, into the in-memory `secrets` volume
/// the server reads them from.
fn assert_secrets_under(pod: &Yaml, container: &Yaml, files: &[&Path]) -> PathBuf {
    let at = mount(container, "secrets");
    let vol = named(&pod["volumes"], "secrets");
    assert_eq!(vol["emptyDir"]["medium"].as_str(), Some("Memory"), "secrets stay off disk");
    let init = &list(&pod["initContainers"])[0];
    assert_eq!(mount(init, "secrets"), at);
    assert!(strings(&init["command"]).iter().any(|c| c.contains("umask 077")), "the copies are 0600");
    for f in files {
        assert!(f.starts_with(&at), "{} is not in the secrets volume {}", f.display(), at.display());
    }
    at
}

fn swap_regions(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let word_edge = |j: usize| j >= b.len() || !b[j].is_ascii_alphabetic();
        let before = i == 0 || !b[i - 1].is_ascii_alphabetic();
        match b.get(i..i + 2) {
            Some(b"eu") if before && word_edge(i + 2) => out.push_str("us"),
            Some(b"us") if before && word_edge(i + 2) => out.push_str("eu"),
            _ => {
                out.push(b[i] as char);
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    out
}

/// The region's StatefulSet runs the image's binary with the ConfigMap's configuration
/// for that region, its data and key directories on two separate persistent volumes.
fn check_region(region: &str) -> (String, u16) {
    let rel = format!("deploy/k8s/region-{region}.yaml");
    let d = docs(&rel);
    let cm = kind(&d, "ConfigMap");
    let name = s(&cm["metadata"]["name"]).to_owned();
    let cfg: Config = toml::from_str(s(&cm["data"]["chatvault.toml"])).unwrap_or_else(|e| panic!("{rel}: {e}"));
    assert_eq!(cfg.region.as_deref(), Some(region));
    let specs = cfg.region_specs().unwrap_or_else(|e| panic!("{rel}: {e}"));
    assert_eq!(specs.len(), 1);
    assert!(cfg.check_listeners().is_ok(), "{rel}: the data listener has TLS");

    let sts = kind(&d, "StatefulSet");
    assert_eq!(s(&sts["metadata"]["name"]), name);
    let pod = &sts["spec"]["template"]["spec"];
    let c = named(&pod["containers"], "chatvault");
    assert_eq!(strings(&c["args"]), ["serve", "--config", "/etc/chatvault/chatvault.toml", "--region", region]);
    assert_eq!(mount(c, "config"), PathBuf::from("/etc/chatvault"));
    assert_eq!(s(&named(&pod["volumes"], "config")["configMap"]["name"]), name);
    assert_eq!(port(c, "grpc"), cfg.listen.port());
    assert_eq!(Some(port(c, "metrics")), cfg.metrics_listen.map(|a| a.port()));
    assert!(cfg.admin_listen.ip().is_loopback(), "the admin API stays in the pod");
    assert_probes(c, cfg.admin_listen.port());
    assert_locked_down(pod, &[&list(&pod["initContainers"])[0], c]);

    // Data and keys: two claims, each directory on its own.
    let claims: Vec<&str> =
        list(&sts["spec"]["volumeClaimTemplates"]).iter().map(|v| s(&v["metadata"]["name"])).collect();
    assert_eq!(claims, ["data", "keys"]);
    assert!(cfg.data_dir.starts_with(mount(c, "data")), "data_dir {} off the data volume", cfg.data_dir.display());
    assert!(cfg.key_dir.starts_with(mount(c, "keys")), "key_dir {} off the key volume", cfg.key_dir.display());
    let tls = cfg.tls.as_ref().expect("TLS on the data listener");
    let secret_files: Vec<&Path> = [cfg.root_key_file.as_deref(), cfg.operator_token_file.as_deref()]
        .into_iter()
        .flatten()
        .chain([tls.cert_file.as_path(), tls.key_file.as_path()])
        .chain(tls.client_ca_file.as_deref())
        .collect();
    assert_eq!(secret_files.len(), 5, "root key and operator token from Secrets, not the image");
    assert_secrets_under(pod, c, &secret_files);

    let svc = kind(&d, "Service");
    assert_eq!(s(&svc["metadata"]["name"]), name);
    let svc_port = named(&svc["spec"]["ports"], "grpc");
    assert_eq!(s(&svc_port["targetPort"]), "grpc");
    let pdb = kind(&d, "PodDisruptionBudget");
    assert_eq!(pdb["spec"]["selector"], sts["spec"]["selector"]);
    // Only router pods reach the data port: nobody else can pass for a trusted proxy.
    let policy = kind(&d, "NetworkPolicy");
    assert_eq!(policy["spec"]["podSelector"], sts["spec"]["selector"]);
    let grpc_from: Vec<&Yaml> = list(&policy["spec"]["ingress"])
        .iter()
        .filter(|rule| list(&rule["ports"]).iter().any(|p| p["port"].as_str() == Some("grpc")))
        .flat_map(|rule| list(&rule["from"]))
        .collect();
    assert_eq!(grpc_from.len(), 1);
    let router_labels = &docs("deploy/k8s/router.yaml")
        .iter()
        .find(|d| d["kind"].as_str() == Some("Deployment"))
        .unwrap()["spec"]["template"]["metadata"]["labels"]
        .clone();
    assert_eq!(&grpc_from[0]["podSelector"]["matchLabels"], router_labels);
    assert_eq!(sts["spec"]["selector"]["matchLabels"], sts["spec"]["template"]["metadata"]["labels"]);
    let other = if region == "eu" { "us" } else { "eu" };
    let hint = cfg.region_endpoints.get(other).expect("the other region's endpoint");
    assert_eq!(hint, &format!("https://chatvault-{other}.chatvault.svc:50051"));
    (format!("{name}.chatvault.svc"), svc_port["port"].as_i64().unwrap() as u16)
}

#[test]
fn the_kubernetes_manifests_match_the_config_code_ports_and_volume_paths() {
    let eu = check_region("eu");
    let us = check_region("us");
    assert_eq!(read("deploy/k8s/region-us.yaml"), swap_regions(&read("deploy/k8s/region-eu.yaml")));

    let d = docs("deploy/k8s/router.yaml");
    let cm = kind(&d, "ConfigMap");
    let cfg: RouterConfig = toml::from_str(s(&cm["data"]["router.toml"])).unwrap();
    cfg.check().unwrap();
    // Every region has a route, to that region's Service.
    assert_eq!(cfg.regions.keys().map(String::as_str).collect::<BTreeSet<_>>(), BTreeSet::from(["eu", "us"]));
    for (region, (host, port)) in [("eu", &eu), ("us", &us)] {
        let uri: http::Uri = cfg.regions[region].endpoint.parse().unwrap();
        assert_eq!((uri.host(), uri.port_u16()), (Some(host.as_str()), Some(*port)), "{region}");
    }
    let dep = kind(&d, "Deployment");
    let pod = &dep["spec"]["template"]["spec"];
    let c = named(&pod["containers"], "router");
    assert_eq!(strings(&c["args"]), ["route", "--config", "/etc/chatvault/router.toml"]);
    assert_eq!(s(&named(&pod["volumes"], "config")["configMap"]["name"]), s(&cm["metadata"]["name"]));
    assert_eq!(port(c, "grpc"), cfg.listen.port());
    let health = cfg.health_listen.expect("a health listener for the probes");
    assert!(health.ip().is_loopback());
    assert_probes(c, health.port());
    assert_locked_down(pod, &[&list(&pod["initContainers"])[0], c]);
    let (tls, up) = (cfg.tls.as_ref().unwrap(), cfg.upstream_tls.as_ref().unwrap());
    let files =
        [&tls.cert_file, &tls.key_file, &up.ca_file, up.cert_file.as_ref().unwrap(), up.key_file.as_ref().unwrap()];
    assert_secrets_under(pod, c, &files.map(PathBuf::as_path));
    assert!(dep["spec"]["replicas"].as_i64().unwrap() >= 2, "the router scales out");
    let svc = kind(&d, "Service");
    assert_eq!(s(&named(&svc["spec"]["ports"], "grpc")["targetPort"]), "grpc");
    assert_eq!(svc["spec"]["externalTrafficPolicy"].as_str(), Some("Local"), "the router sees the client's address");
    assert_eq!(kind(&d, "PodDisruptionBudget")["spec"]["selector"], dep["spec"]["selector"]);
}

#[test]
fn the_dockerfile_copies_what_exists_runs_unprivileged_and_checks_health_over_grpc() {
    let text = read("deploy/Dockerfile");
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.starts_with('#')).collect();
    let cfg: Config = toml::from_str(&read("deploy/chatvault.toml")).unwrap();
    let mut stages = 0;
    for l in &lines {
        if let Some(rest) = l.strip_prefix("FROM ") {
            stages += 1;
            if let Some(v) = rest.strip_prefix("rust:").and_then(|t| t.split('-').next()) {
                let toml: toml::Value = toml::from_str(&read("Cargo.toml")).unwrap();
                let msrv = toml["package"]["rust-version"].as_str().unwrap();
                let num = |s: &str| s.split('.').map(|p| p.parse::<u32>().unwrap()).collect::<Vec<_>>();
                assert!(num(v) >= num(msrv), "the build image's Rust {v} is older than rust-version {msrv}");
            }
        }
        if let Some(rest) = l.strip_prefix("COPY ") {
            let parts: Vec<&str> = rest.split_whitespace().collect();
            if parts[0].starts_with("--from") {
                assert_eq!(&parts[1..], ["/src/target/release/chatvault", BINARY]);
                continue;
            }
            for src in &parts[..parts.len() - 1] {
                assert!(Path::new(ROOT).join(src).exists(), "COPY {src}: no such path in the repository");
            }
        }
    }
    assert!(stages >= 2, "a multi-stage build");
    let user = lines.iter().find_map(|l| l.strip_prefix("USER ")).expect("USER");
    assert!(!user.starts_with("root") && !user.starts_with("0"), "USER {user}");
    assert!(lines.contains(&"COPY deploy/chatvault.toml /etc/chatvault/chatvault.toml"));
    assert!(lines.iter().any(|l| *l == format!("ENTRYPOINT [\"{BINARY}\"]")));
    assert!(lines.contains(&"CMD [\"serve\", \"--config\", \"/etc/chatvault/chatvault.toml\"]"));
    let health =
        format!("CMD [\"{BINARY}\", \"health\", \"--server\", \"http://127.0.0.1:{}\"]", cfg.admin_listen.port());
    assert!(text.contains(&health), "HEALTHCHECK asks grpc.health.v1 on the admin port");
    let expose: Vec<u16> = lines
        .iter()
        .find_map(|l| l.strip_prefix("EXPOSE "))
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    let metrics = cfg.metrics_listen.unwrap().port();
    assert_eq!(expose, [cfg.listen.port(), cfg.admin_listen.port(), metrics]);
    let volumes = lines.iter().find_map(|l| l.strip_prefix("VOLUME ")).unwrap();
    let volumes: Vec<String> = serde_json::from_str(volumes).unwrap();
    assert!(cfg.data_dir.starts_with(&volumes[0]) && cfg.key_dir.starts_with(&volumes[1]), "{volumes:?}");
    assert!(!text.contains("root.key") && !text.contains("ROOT_KEY"), "no key is baked into the image");
}

#[test]
fn the_systemd_units_serve_one_region_from_its_own_directories() {
    let unit = read("deploy/systemd/chatvault@.service");
    let cfg: Config = toml::from_str(&read("deploy/chatvault.toml")).unwrap();
    let region = cfg.region.clone().unwrap();
    let exec = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).unwrap();
    assert_eq!(exec, format!("{BINARY} serve --config /etc/chatvault/%i.toml --region %i"));
    let rw: Vec<PathBuf> = unit
        .lines()
        .find_map(|l| l.strip_prefix("ReadWritePaths="))
        .unwrap()
        .split_whitespace()
        .map(|p| PathBuf::from(p.replace("%i", &region)))
        .collect();
    assert!(rw.contains(&cfg.data_dir) && rw.contains(&cfg.key_dir), "{rw:?}");
    for line in ["UMask=0077", "LimitCORE=0", "NoNewPrivileges=true"] {
        assert!(unit.lines().any(|l| l == line), "{line}");
    }
    let router = read("deploy/systemd/chatvault-router.service");
    assert!(router.lines().any(|l| l == format!("ExecStart={BINARY} route --config /etc/chatvault/router.toml")));
    let rcfg: RouterConfig = toml::from_str(&read("deploy/router.toml")).unwrap();
    rcfg.check().unwrap();
}

#[test]
fn the_region_swap_used_to_check_the_us_manifest_swaps_whole_names_only() {
    assert_eq!(swap_regions("eu us museum eu-x chatvault-us"), "us eu museum us-x chatvault-eu");
}
