//! Several "hosts" on one machine for the cross-host tests: a network namespace per host, each
//! with one veth link to a bridge in a switch namespace of its own, and one more link from the
//! test's own (root) namespace to that bridge, so the test reaches every host. Each network
//! gets a /24 of its own under 10.88/16 and names carrying the test process's id; dropping it
//! deletes the namespaces (and with them every link) and their `/etc/netns` files.
//!
//! A host's `/etc/hosts` can be set (`ip netns exec` mounts `/etc/netns/NS/hosts` over it for
//! the programs it starts): that is how `squall up --forkd-dns` is shown daemons that appear.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;

/// One test's network of hosts.
pub(crate) struct Net {
    /// What every name starts with.
    tag: String,
    /// The third octet of the network's addresses.
    subnet: u8,
    /// The hosts' names, in the order their addresses were given (host `i` is `.i+1`).
    hosts: Vec<String>,
}

/// Runs `ip ARGS...`; panics with what it said if it fails.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Net {
    /// A network of `hosts` (named by the caller), or `None`, with the reason printed, where
    /// this process may not make network namespaces (not root).
    pub(crate) fn new(hosts: &[&str]) -> Option<Net> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let pid = std::process::id();
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tag = format!("sq{pid}n{n}");
        let probe = format!("{tag}probe");
        let made = Command::new("ip")
            .args(["netns", "add", &probe])
            .output()
            .unwrap();
        if !made.status.success() {
            eprintln!(
                "skipped: cannot make network namespaces here (root is needed): {}",
                String::from_utf8_lossy(&made.stderr).trim()
            );
            return None;
        }
        ip(&["netns", "del", &probe]);
        remove_stale();
        let net = Net {
            subnet: ((pid + n) % 200 + 20) as u8,
            hosts: hosts.iter().map(|h| (*h).to_owned()).collect(),
            tag,
        };
        let switch = net.ns("sw");
        ip(&["netns", "add", &switch]);
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &switch, "link", "set", "br0", "up"]);
        for (i, host) in hosts.iter().enumerate() {
            let ns = net.ns(host);
            ip(&["netns", "add", &ns]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            net.link(&ns, &format!("{}{i}", net.tag), &net.addr(host).to_string());
        }
        // The test's own end, in the root namespace, last on the network.
        let root_end = format!("{}r", net.tag);
        let peer = format!("{}pr", net.tag);
        ip(&[
            "link", "add", &root_end, "type", "veth", "peer", "name", &peer,
        ]);
        ip(&["link", "set", &peer, "netns", &switch]);
        ip(&["-n", &switch, "link", "set", &peer, "master", "br0", "up"]);
        let root_addr = format!("10.88.{}.254/24", net.subnet);
        ip(&["addr", "add", &root_addr, "dev", &root_end]);
        ip(&["link", "set", &root_end, "up"]);
        Some(net)
    }

    /// Links namespace `ns` to the bridge with a veth pair (`name` in `ns`, renamed `eth0`)
    /// and gives it `addr`.
    fn link(&self, ns: &str, name: &str, addr: &str) {
        let switch = self.ns("sw");
        let peer = format!("{name}p");
        ip(&["link", "add", name, "type", "veth", "peer", "name", &peer]);
        ip(&["link", "set", name, "netns", ns]);
        ip(&["link", "set", &peer, "netns", &switch]);
        ip(&["-n", &switch, "link", "set", &peer, "master", "br0", "up"]);
        ip(&["-n", ns, "link", "set", name, "name", "eth0"]);
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", ns, "link", "set", "eth0", "up"]);
    }

    /// The namespace of `host`.
    pub(crate) fn ns(&self, host: &str) -> String {
        format!("{}{host}", self.tag)
    }

    /// The address of `host`.
    pub(crate) fn addr(&self, host: &str) -> Ipv4Addr {
        let i = self
            .hosts
            .iter()
            .position(|h| h == host)
            .unwrap_or_else(|| panic!("no host {host}"));
        Ipv4Addr::new(10, 88, self.subnet, i as u8 + 1)
    }

    /// A command that runs `program` in `host`'s namespace, killed if the test's thread dies
    /// (a test killed outright leaves no daemon behind in a namespace).
    pub(crate) fn command(&self, host: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.ns(host)])
            .args(["setpriv", "--pdeathsig", "KILL", "--"])
            .arg(program);
        command
    }

    /// Sets what `/etc/hosts` says in `host`'s namespace: for programs started from now on,
    /// and, once the file exists, for those started since (it is rewritten in place, and
    /// `ip netns exec` mounted that very file over their `/etc/hosts`).
    pub(crate) fn set_hosts_file(&self, host: &str, text: &str) {
        let dir = self.etc(host);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("hosts"), text).unwrap();
    }

    fn etc(&self, host: &str) -> PathBuf {
        PathBuf::from("/etc/netns").join(self.ns(host))
    }

    /// Limits what `host` sends to `rate` (`tc` token bucket, such as `20mbit`).
    pub(crate) fn shape(&self, host: &str, rate: &str) {
        let out = self
            .command(host, "tc")
            .args([
                "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", rate,
            ])
            .args(["burst", "64kb", "latency", "100ms"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Bytes `host` has sent on its link.
    pub(crate) fn sent(&self, host: &str) -> u64 {
        let out = self
            .command(host, "cat")
            .arg("/sys/class/net/eth0/statistics/tx_bytes")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }
}

/// Deletes the namespaces (and `/etc/netns` files) of test processes that are gone: a test
/// killed outright (a timeout) could not delete its own.
fn remove_stale() {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(pid) = name
            .strip_prefix("sq")
            .and_then(|rest| rest.split_once('n'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
            let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(name));
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for host in self.hosts.iter().chain([&"sw".to_owned()]) {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(host)])
                .output();
            let _ = std::fs::remove_dir_all(self.etc(host));
        }
    }
}
