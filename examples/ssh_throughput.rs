//! Throughput of the embedded SSH client against OpenSSH's own `ssh`, through a private
//! OpenSSH sshd on 127.0.0.1: N MiB downloaded (the forced command runs `head -c N
//! /dev/zero`) and uploaded (`cat > /dev/null`), each measured from the start of the
//! connection to the exit status, both clients in turns in the same run; medians, and the
//! throughput ratio ours / ssh's. `ssh` is measured twice: piped into (out of) this process,
//! as a command destination uses it, and with its stdout on /dev/null (stdin from a sparse
//! file), its own best case. `--russh-defaults` runs ours with russh's default settings.
//!
//! ```sh
//! cargo run --release --example ssh_throughput -- [--mib 1024] [--rounds 3]
//!     [--window BYTES] [--packet BYTES] [--chunk BYTES] [--buffer MSGS] [--cipher NAME]
//!     [--ssh-cipher NAME] [--russh-defaults]
//! ```
//!
//! Needs `/usr/sbin/sshd`, `ssh` and `ssh-keygen`; runs as any user (sshd then only lets that
//! user in). Everything lives in a temporary directory; sshd's log goes to a file there.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mailreplica::transport::ssh::{SshConnection, SshSettings, Tuning};

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Bench {
    port: u16,
    user: String,
    key: PathBuf,
    known_hosts: PathBuf,
    tuning: Tuning,
    ssh_cipher: Option<String>,
    _sshd: KillOnDrop,
}

fn keygen(path: &Path) {
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .status()
        .expect("ssh-keygen");
    assert!(st.success(), "ssh-keygen failed");
}

impl Bench {
    fn start(dir: &Path, tuning: Tuning, ssh_cipher: Option<String>) -> Self {
        assert!(Path::new("/usr/sbin/sshd").exists(), "/usr/sbin/sshd is missing (apt-get install openssh-server)");
        if nix::unistd::geteuid().is_root() && !Path::new("/run/sshd").exists() {
            fs::create_dir_all("/run/sshd").expect("mkdir /run/sshd");
        }
        let host = dir.join("host");
        let key = dir.join("client");
        keygen(&host);
        keygen(&key);
        let forced = dir.join("forced.sh");
        fs::write(
            &forced,
            "#!/bin/sh\ncase \"$SSH_ORIGINAL_COMMAND\" in\n  down\\ *) exec head -c \"${SSH_ORIGINAL_COMMAND#down }\" /dev/zero ;;\n  *) exec cat > /dev/null ;;\nesac\n",
        )
        .expect("forced.sh");
        fs::set_permissions(&forced, fs::Permissions::from_mode(0o755)).expect("chmod");
        let pubkey = fs::read_to_string(key.with_extension("pub")).expect("pub");
        let ak = dir.join("authorized_keys");
        fs::write(&ak, format!("restrict,command=\"{}\" {}", forced.display(), pubkey.trim())).expect("ak");
        let user = nix::unistd::User::from_uid(nix::unistd::geteuid()).ok().flatten().expect("passwd entry").name;
        let log = dir.join("sshd.log");
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
            let cfg = dir.join("sshd_config");
            fs::write(
                &cfg,
                format!(
                    "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nPidFile none\nAuthorizedKeysFile {}\n\
                     StrictModes no\nUsePAM no\nPermitRootLogin forced-commands-only\nPasswordAuthentication no\n\
                     KbdInteractiveAuthentication no\nLogLevel ERROR\n",
                    host.display(),
                    ak.display()
                ),
            )
            .expect("sshd_config");
            let logf = File::create(&log).expect("log");
            let child = Command::new("/usr/sbin/sshd")
                .args(["-D", "-e", "-f"])
                .arg(&cfg)
                .stdin(Stdio::null())
                .stdout(logf.try_clone().expect("dup"))
                .stderr(logf)
                .spawn()
                .expect("sshd");
            let mut child = KillOnDrop(child);
            let until = Instant::now() + Duration::from_secs(10);
            while Instant::now() < until {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    let known_hosts = dir.join("known_hosts");
                    let host_pub = fs::read_to_string(host.with_extension("pub")).expect("host pub");
                    fs::write(&known_hosts, format!("[127.0.0.1]:{port} {}", host_pub.trim())).expect("kh");
                    return Self { port, user, key, known_hosts, tuning, ssh_cipher, _sshd: child };
                }
                if let Ok(Some(_)) = child.0.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("sshd did not start: {}", fs::read_to_string(&log).unwrap_or_default());
    }

    fn ours(&self, command: &str) -> (SshConnection, mailreplica::transport::ssh::SshChannel) {
        let mut s = SshSettings::new("127.0.0.1", self.port, &self.user);
        s.key_file = Some(self.key.clone());
        s.known_hosts = self.known_hosts.clone();
        s.use_agent = false;
        s.tuning = self.tuning.clone();
        let mut conn = SshConnection::connect(&s).expect("connect");
        let ch = conn.exec(command).expect("exec");
        (conn, ch)
    }

    fn ssh(&self, command: &str) -> Command {
        let mut c = Command::new("ssh");
        c.args([
            "-F",
            "/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "IdentitiesOnly=yes",
        ])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", self.known_hosts.display()))
        .arg("-i")
        .arg(&self.key)
        .args(["-p", &self.port.to_string()]);
        if let Some(cipher) = &self.ssh_cipher {
            c.args(["-c", cipher]);
        }
        c.arg(format!("{}@127.0.0.1", self.user)).arg(command);
        c
    }

    fn download_ours(&self, bytes: u64) -> Duration {
        let t = Instant::now();
        let (conn, ch) = self.ours(&format!("down {bytes}"));
        let mut reader = ch.reader;
        let mut buf = vec![0u8; 256 << 10];
        let mut got = 0u64;
        loop {
            let n = reader.read(&mut buf).expect("read");
            if n == 0 {
                break;
            }
            got += n as u64;
        }
        drop(ch.writer);
        let end = ch.end.wait(Duration::from_secs(60)).expect("exit status");
        assert!(end.success(), "{end:?}");
        assert_eq!(got, bytes);
        conn.close();
        t.elapsed()
    }

    fn download_ssh(&self, bytes: u64) -> Duration {
        let t = Instant::now();
        let mut child = self
            .ssh(&format!("down {bytes}"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("ssh");
        let mut out = child.stdout.take().expect("stdout");
        let mut buf = vec![0u8; 256 << 10];
        let mut got = 0u64;
        loop {
            let n = out.read(&mut buf).expect("read");
            if n == 0 {
                break;
            }
            got += n as u64;
        }
        assert!(child.wait().expect("wait").success());
        assert_eq!(got, bytes);
        t.elapsed()
    }

    /// `ssh … > /dev/null`: no pipe into this process, ssh's own best case.
    fn download_ssh_devnull(&self, bytes: u64) -> Duration {
        let t = Instant::now();
        let st = self.ssh(&format!("down {bytes}")).stdin(Stdio::null()).stdout(Stdio::null()).status().expect("ssh");
        assert!(st.success());
        t.elapsed()
    }

    /// `ssh … < FILE` (a sparse file of `bytes` zeros): no pipe from this process.
    fn upload_ssh_file(&self, file: &Path) -> Duration {
        let t = Instant::now();
        let st = self.ssh("up").stdin(File::open(file).expect("open")).stdout(Stdio::null()).status().expect("ssh");
        assert!(st.success());
        t.elapsed()
    }

    fn upload_ours(&self, bytes: u64) -> Duration {
        let t = Instant::now();
        let (conn, ch) = self.ours("up");
        let mut writer = ch.writer;
        let buf = vec![b'x'; 64 << 10];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            writer.write_all(&buf[..n]).expect("write");
            left -= n as u64;
        }
        writer.close().expect("close");
        let end = ch.end.wait(Duration::from_secs(60)).expect("exit status");
        assert!(end.success(), "{end:?}");
        conn.close();
        t.elapsed()
    }

    fn upload_ssh(&self, bytes: u64) -> Duration {
        let t = Instant::now();
        let mut child =
            self.ssh("up").stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::inherit()).spawn().expect("ssh");
        let mut stdin = child.stdin.take().expect("stdin");
        let buf = vec![b'x'; 64 << 10];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            stdin.write_all(&buf[..n]).expect("write");
            left -= n as u64;
        }
        drop(stdin);
        assert!(child.wait().expect("wait").success());
        t.elapsed()
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn arg<T: std::str::FromStr>(args: &[String], name: &str) -> Option<T> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name}: bad value {v:?}")))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mib: u64 = arg(&args, "--mib").unwrap_or(1024);
    let rounds: usize = arg(&args, "--rounds").unwrap_or(3);
    let mut tuning = Tuning::default();
    if let Some(w) = arg(&args, "--window") {
        tuning.window_size = w;
    }
    if let Some(p) = arg(&args, "--packet") {
        tuning.maximum_packet_size = p;
    }
    if let Some(c) = arg(&args, "--chunk") {
        tuning.write_chunk = c;
    }
    if let Some(b) = arg(&args, "--buffer") {
        tuning.channel_buffer_size = b;
    }
    if args.iter().any(|a| a == "--russh-defaults") {
        // russh 0.65's own defaults (client::Config, Preferred::DEFAULT), for comparison.
        tuning = Tuning {
            window_size: 2 << 20,
            maximum_packet_size: 32768,
            channel_buffer_size: 100,
            write_chunk: 32 << 10,
            ciphers: vec![
                russh::cipher::CHACHA20_POLY1305,
                russh::cipher::AES_256_GCM,
                russh::cipher::AES_256_CTR,
                russh::cipher::AES_128_CTR,
            ],
        };
    }
    if let Some(c) = arg::<String>(&args, "--cipher") {
        let name =
            russh::cipher::ALL_CIPHERS.iter().find(|n| n.as_ref() == c).unwrap_or_else(|| panic!("unknown cipher {c}"));
        tuning.ciphers = vec![**name];
    }
    let ssh_cipher: Option<String> = arg(&args, "--ssh-cipher");
    let dir = std::env::temp_dir().join(format!("ssh-throughput-{}", std::process::id()));
    fs::create_dir_all(&dir).expect("temp dir");
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).expect("chmod");
    let bench = Bench::start(&dir, tuning.clone(), ssh_cipher.clone());
    let bytes = mib << 20;
    let zeros = dir.join("zeros");
    File::create(&zeros).expect("zeros").set_len(bytes).expect("sparse file");
    println!(
        "{mib} MiB, {rounds} rounds, ours: window {} packet {} chunk {} buffer {} ciphers {:?}; ssh cipher {}",
        tuning.window_size,
        tuning.maximum_packet_size,
        tuning.write_chunk,
        tuning.channel_buffer_size,
        tuning.ciphers.iter().map(|c| c.as_ref().to_owned()).collect::<Vec<_>>(),
        ssh_cipher.as_deref().unwrap_or("(default)")
    );
    let (mut dl_ours, mut dl_ssh, mut ul_ours, mut ul_ssh) = (vec![], vec![], vec![], vec![]);
    let (mut dl_raw, mut ul_raw) = (vec![], vec![]);
    for r in 0..rounds {
        dl_raw.push(bench.download_ssh_devnull(bytes));
        ul_raw.push(bench.upload_ssh_file(&zeros));
        // Alternate who goes first, so that load on the machine hits both alike.
        if r % 2 == 0 {
            dl_ours.push(bench.download_ours(bytes));
            dl_ssh.push(bench.download_ssh(bytes));
            ul_ours.push(bench.upload_ours(bytes));
            ul_ssh.push(bench.upload_ssh(bytes));
        } else {
            dl_ssh.push(bench.download_ssh(bytes));
            dl_ours.push(bench.download_ours(bytes));
            ul_ssh.push(bench.upload_ssh(bytes));
            ul_ours.push(bench.upload_ours(bytes));
        }
        eprintln!(
            "round {}: download ours {:.2} s ssh {:.2} s (>/dev/null {:.2} s); upload ours {:.2} s ssh {:.2} s (<file {:.2} s)",
            r + 1,
            dl_ours[r].as_secs_f64(),
            dl_ssh[r].as_secs_f64(),
            dl_raw[r].as_secs_f64(),
            ul_ours[r].as_secs_f64(),
            ul_ssh[r].as_secs_f64(),
            ul_raw[r].as_secs_f64()
        );
    }
    let mbs = |d: Duration| bytes as f64 / d.as_secs_f64() / 1e6;
    for (what, ours, theirs, raw) in [("download", dl_ours, dl_ssh, dl_raw), ("upload", ul_ours, ul_ssh, ul_raw)] {
        let (o, t, r) = (median(ours), median(theirs), median(raw));
        println!(
            "{what:8}: ours {:6.2} s ({:4.0} MB/s)   ssh piped {:6.2} s ({:4.0} MB/s) ratio {:.2}x   \
             ssh to/from a file {:6.2} s ({:4.0} MB/s) ratio {:.2}x",
            o.as_secs_f64(),
            mbs(o),
            t.as_secs_f64(),
            mbs(t),
            t.as_secs_f64() / o.as_secs_f64(),
            r.as_secs_f64(),
            mbs(r),
            r.as_secs_f64() / o.as_secs_f64()
        );
    }
    drop(bench);
    let _ = fs::remove_dir_all(&dir);
}
