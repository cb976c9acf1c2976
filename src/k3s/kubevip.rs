//! KubeVIP for the control plane: with `kubevip.eip` (or `enable`), servers write the RBAC
//! manifest and the kube-vip DaemonSet into `<root>/var/lib/rancher/k3s/server/manifests/`
//! (k3s applies them), or the static pod into `<root>/var/lib/rancher/k3s/agent/pod-manifests/`
//! with `static_pod`. ARP mode, control-plane VIP on port 6443, leader election on. With
//! `manifest_url` the RBAC manifest is downloaded (http or https, see `crate::download`) instead
//! of the built-in one.

use std::time::Duration;

use super::files::{self, PRIVATE};
use super::{API_PORT, K3S_YAML, MANIFESTS_DIR, POD_MANIFESTS_DIR, Root};
use crate::config::{Config, KubeVipConfig};
use crate::download;

/// kube-vip version used when `kubevip.version` is empty.
pub const DEFAULT_VERSION: &str = "v0.8.9";
/// File name of the RBAC manifest.
pub const RBAC_FILE: &str = "kairos-p2p-kube-vip-rbac.yaml";
/// File name of the DaemonSet or static pod manifest.
pub const POD_FILE: &str = "kairos-p2p-kube-vip.yaml";
/// Largest RBAC manifest downloaded.
const MAX_MANIFEST_BYTES: u64 = 1024 * 1024;
/// Time allowed for the download.
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);

/// Writes the KubeVIP manifests when KubeVIP is on (else nothing). `iface` is the interface
/// that carries the VIP when `kubevip.interface` is empty.
pub fn deploy(cfg: &Config, root: &Root, iface: &str) -> Result<(), String> {
    let kv = &cfg.kubevip;
    if !kv.enable {
        return Ok(());
    }
    let Some(eip) = kv.eip else {
        return Err("KubeVIP is enabled but kubevip.eip is not set".to_string());
    };
    let iface = kv.interface.as_deref().unwrap_or(iface);
    let rbac = match &kv.manifest_url {
        Some(url) => fetch(url)?,
        None => RBAC.to_string(),
    };
    let (dir, pod) = if kv.static_pod {
        (POD_MANIFESTS_DIR, static_pod(kv, &eip.to_string(), iface))
    } else {
        (MANIFESTS_DIR, daemonset(kv, &eip.to_string(), iface))
    };
    let write = |dir: &str, name: &str, text: &str| {
        files::write(
            &root.path(format!("{dir}/{name}")),
            text.as_bytes(),
            PRIVATE,
        )
        .map(drop)
        .map_err(|e| e.to_string())
    };
    write(MANIFESTS_DIR, RBAC_FILE, &rbac)?;
    write(dir, POD_FILE, &pod)
}

/// Downloads the manifest at `url`.
pub fn fetch(url: &str) -> Result<String, String> {
    let limits = download::Limits {
        max_bytes: MAX_MANIFEST_BYTES,
        timeout: FETCH_TIMEOUT,
    };
    let text = download::text(url, limits)
        .map_err(|e| format!("the KubeVIP manifest (kubevip.manifest_url): {e}"))?;
    if text.trim().is_empty() {
        return Err(format!("the KubeVIP manifest {url} is empty"));
    }
    Ok(text)
}

fn image(kv: &KubeVipConfig) -> String {
    let version = kv.version.as_deref().unwrap_or(DEFAULT_VERSION);
    format!("{}:{version}", kv.image)
}

/// A YAML double-quoted scalar.
fn q(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_string())
}

fn env_block(eip: &str, iface: &str, indent: &str) -> String {
    let vars = [
        ("vip_arp", "true".to_string()),
        ("port", API_PORT.to_string()),
        ("vip_interface", iface.to_string()),
        ("vip_cidr", "32".to_string()),
        ("cp_enable", "true".to_string()),
        ("cp_namespace", "kube-system".to_string()),
        ("vip_ddns", "false".to_string()),
        ("svc_enable", "false".to_string()),
        ("vip_leaderelection", "true".to_string()),
        ("vip_leasename", "plndr-cp-lock".to_string()),
        ("vip_leaseduration", "5".to_string()),
        ("vip_renewdeadline", "3".to_string()),
        ("vip_retryperiod", "1".to_string()),
        ("address", eip.to_string()),
    ];
    vars.iter()
        .map(|(k, v)| format!("{indent}- name: {k}\n{indent}  value: {}\n", q(v)))
        .collect()
}

fn container(kv: &KubeVipConfig, eip: &str, iface: &str, indent: &str) -> String {
    format!(
        "{indent}- name: kube-vip\n\
         {indent}  image: {image}\n\
         {indent}  imagePullPolicy: IfNotPresent\n\
         {indent}  args: [\"manager\"]\n\
         {indent}  env:\n{env}\
         {indent}  securityContext:\n\
         {indent}    capabilities:\n\
         {indent}      add: [\"NET_ADMIN\", \"NET_RAW\"]\n",
        image = q(&image(kv)),
        env = env_block(eip, iface, &format!("{indent}  "))
    )
}

/// The DaemonSet on control-plane nodes.
pub fn daemonset(kv: &KubeVipConfig, eip: &str, iface: &str) -> String {
    format!(
        "# written by kairos-p2p: kube-vip for the control-plane VIP {eip}\n\
         apiVersion: apps/v1\nkind: DaemonSet\nmetadata:\n  name: kube-vip-ds\n  \
         namespace: kube-system\n  labels:\n    app.kubernetes.io/name: kube-vip-ds\n\
         spec:\n  selector:\n    matchLabels:\n      app.kubernetes.io/name: kube-vip-ds\n  \
         template:\n    metadata:\n      labels:\n        app.kubernetes.io/name: kube-vip-ds\n    \
         spec:\n      affinity:\n        nodeAffinity:\n          \
         requiredDuringSchedulingIgnoredDuringExecution:\n            nodeSelectorTerms:\n            \
         - matchExpressions:\n              - key: node-role.kubernetes.io/master\n                \
         operator: Exists\n            - matchExpressions:\n              \
         - key: node-role.kubernetes.io/control-plane\n                operator: Exists\n      \
         hostNetwork: true\n      serviceAccountName: kube-vip\n      tolerations:\n      \
         - effect: NoSchedule\n        operator: Exists\n      - effect: NoExecute\n        \
         operator: Exists\n      containers:\n{}",
        container(kv, eip, iface, "      ")
    )
}

/// The static pod (the kubelet runs it; it talks to the API with k3s' admin kubeconfig).
pub fn static_pod(kv: &KubeVipConfig, eip: &str, iface: &str) -> String {
    let mut c = container(kv, eip, iface, "  ");
    c.push_str(
        "    volumeMounts:\n    - mountPath: /etc/kubernetes/admin.conf\n      name: kubeconfig\n",
    );
    format!(
        "# written by kairos-p2p: kube-vip for the control-plane VIP {eip}\n\
         apiVersion: v1\nkind: Pod\nmetadata:\n  name: kube-vip\n  namespace: kube-system\n\
         spec:\n  hostNetwork: true\n  containers:\n{c}  volumes:\n  - name: kubeconfig\n    \
         hostPath:\n      path: {K3S_YAML}\n"
    )
}

/// The built-in RBAC manifest (kube-vip's documented one).
pub const RBAC: &str = "# written by kairos-p2p: RBAC for kube-vip
apiVersion: v1
kind: ServiceAccount
metadata:
  name: kube-vip
  namespace: kube-system
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  annotations:
    rbac.authorization.kubernetes.io/autoupdate: \"true\"
  name: system:kube-vip-role
rules:
  - apiGroups: [\"\"]
    resources: [\"services/status\"]
    verbs: [\"update\"]
  - apiGroups: [\"\"]
    resources: [\"services\", \"endpoints\"]
    verbs: [\"list\", \"get\", \"watch\", \"update\"]
  - apiGroups: [\"\"]
    resources: [\"nodes\"]
    verbs: [\"list\", \"get\", \"watch\", \"update\", \"patch\"]
  - apiGroups: [\"coordination.k8s.io\"]
    resources: [\"leases\"]
    verbs: [\"list\", \"get\", \"watch\", \"update\", \"create\"]
  - apiGroups: [\"discovery.k8s.io\"]
    resources: [\"endpointslices\"]
    verbs: [\"list\", \"get\", \"watch\", \"update\"]
---
kind: ClusterRoleBinding
apiVersion: rbac.authorization.k8s.io/v1
metadata:
  name: system:kube-vip-binding
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: system:kube-vip-role
subjects:
- kind: ServiceAccount
  name: kube-vip
  namespace: kube-system
";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{self, HostFacts};
    use std::io::{Read as _, Write as _};
    use std::path::Path;

    fn cfg(extra: &str) -> Config {
        let text = format!("#cloud-config\np2p:\n  network_id: t\n{extra}");
        config::parse(&[(Path::new("t.yaml"), &text)], &HostFacts::default()).unwrap()
    }

    fn root(name: &str) -> Root {
        let d = std::env::temp_dir().join(format!("kp2p-kubevip-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        Root::new(d)
    }

    #[test]
    fn nothing_without_kubevip() {
        let r = root("off");
        deploy(&cfg(""), &r, "eth0").unwrap();
        assert!(!r.dir().exists());
    }

    #[test]
    fn daemonset_and_rbac() {
        let r = root("ds");
        let c = cfg("kubevip:\n  eip: 192.168.1.50\n  version: v0.8.0\n");
        deploy(&c, &r, "eth0").unwrap();
        let ds = std::fs::read_to_string(r.path(format!("{MANIFESTS_DIR}/{POD_FILE}"))).unwrap();
        for want in [
            "kind: DaemonSet",
            "image: \"ghcr.io/kube-vip/kube-vip:v0.8.0\"",
            "- name: address\n          value: \"192.168.1.50\"",
            "- name: vip_interface\n          value: \"eth0\"",
            "- name: port\n          value: \"6443\"",
            "- name: vip_arp\n          value: \"true\"",
            "- name: vip_leaderelection\n          value: \"true\"",
            "- name: cp_enable\n          value: \"true\"",
        ] {
            assert!(ds.contains(want), "{want} not in\n{ds}");
        }
        // Valid YAML with the expected shape.
        let v: serde_yaml::Value = serde_yaml::from_str(&ds).unwrap();
        assert_eq!(v["spec"]["template"]["spec"]["hostNetwork"], true);
        let rbac = std::fs::read_to_string(r.path(format!("{MANIFESTS_DIR}/{RBAC_FILE}"))).unwrap();
        assert!(rbac.contains("system:kube-vip-role"));
        for doc in serde_yaml::Deserializer::from_str(&rbac) {
            serde_yaml::Value::deserialize(doc).unwrap();
        }
        std::fs::remove_dir_all(r.dir()).unwrap();
    }

    /// Hostile values cannot add keys to the manifest: every value is a quoted scalar (control
    /// characters escaped), and the configuration refuses control characters in image, version
    /// and interface before they get here.
    #[test]
    fn hostile_values_stay_inside_their_scalar() {
        let mut c = cfg("kubevip:\n  eip: 10.0.0.9\n");
        c.kubevip.image = "img\"\n  hostPID: true\n#".to_string();
        c.kubevip.version = Some("v1\r\n- name: evil".to_string());
        let ds = daemonset(&c.kubevip, "10.0.0.9", "eth0\u{0}\n    privileged: true");
        assert!(
            !ds.contains("\n  hostPID") && !ds.contains("\n- name: evil"),
            "{ds}"
        );
        let v: serde_yaml::Value = serde_yaml::from_str(&ds).unwrap();
        let container = &v["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(
            container["image"],
            "img\"\n  hostPID: true\n#:v1\r\n- name: evil"
        );
        assert!(v["spec"]["template"]["spec"].get("hostPID").is_none());
        let names: Vec<&str> = container["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap())
            .collect();
        assert_eq!(names.len(), 14, "{names:?}");
        for bad in [
            "  image: \"a\\nb\"\n",
            "  version: \"a\\rb\"\n",
            "  interface: \"a\\nb\"\n",
        ] {
            let text = format!("p2p:\n  network_id: t\nkubevip:\n  eip: 10.0.0.9\n{bad}");
            let parsed = crate::config::parse(
                &[(std::path::Path::new("t.yaml"), &text)],
                &crate::config::HostFacts::default(),
            );
            assert!(parsed.is_err(), "{bad}");
        }
    }

    #[test]
    fn static_pod_with_interface() {
        let r = root("pod");
        let c = cfg("kubevip:\n  eip: 10.0.0.9\n  static_pod: true\n  interface: enp1s0\n");
        deploy(&c, &r, "eth0").unwrap();
        let pod =
            std::fs::read_to_string(r.path(format!("{POD_MANIFESTS_DIR}/{POD_FILE}"))).unwrap();
        let v: serde_yaml::Value = serde_yaml::from_str(&pod).unwrap();
        assert_eq!(v["kind"], "Pod");
        assert_eq!(v["spec"]["volumes"][0]["hostPath"]["path"], K3S_YAML);
        assert!(pod.contains("value: \"enp1s0\""), "{pod}");
        assert!(pod.contains(&format!(":{DEFAULT_VERSION}\"")));
        std::fs::remove_dir_all(r.dir()).unwrap();
    }

    #[test]
    fn manifest_url_is_downloaded() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let body = "# fetched RBAC\nkind: ServiceAccount\n";
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 2048];
            let n = s.read(&mut buf).unwrap();
            let request = String::from_utf8_lossy(&buf[..n]).to_string();
            write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            request
        });
        let r = root("url");
        let c = cfg(&format!(
            "kubevip:\n  eip: 10.0.0.9\n  manifest_url: http://127.0.0.1:{port}/rbac.yaml\n"
        ));
        deploy(&c, &r, "eth0").unwrap();
        let request = server.join().unwrap();
        assert!(request.starts_with("GET /rbac.yaml HTTP/1.1"), "{request}");
        let rbac = std::fs::read_to_string(r.path(format!("{MANIFESTS_DIR}/{RBAC_FILE}"))).unwrap();
        assert_eq!(rbac, body);
        // A server that is not there: the error names the URL.
        let e = fetch(&format!("http://127.0.0.1:{port}/rbac.yaml")).unwrap_err();
        assert!(e.contains("/rbac.yaml"), "{e}");
        std::fs::remove_dir_all(r.dir()).unwrap();
    }

    use serde::Deserialize as _;
}
