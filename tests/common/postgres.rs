//! A throwaway PostgreSQL cluster per test: initdb in a temporary directory, started on a free
//! port, stopped (immediately) when dropped. Needs the Debian `postgresql` package, which the
//! README's test command installs; as root the server runs as the `postgres` user.

use std::path::PathBuf;
use std::process::Command;

pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
}

fn as_postgres(program: &std::path::Path) -> Command {
    if unsafe { libc::geteuid() } == 0 {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

impl Postgres {
    pub fn start() -> Postgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|entries| entries.flatten().map(|e| e.path().join("bin")).filter(|p| p.join("initdb").exists()).max())
            .expect("PostgreSQL server binaries not found under /usr/lib/postgresql: the README's test command installs them (postgresql)");
        let dir = tempfile::tempdir().unwrap();
        if unsafe { libc::geteuid() } == 0 {
            let pw = Command::new("id").args(["-u", "postgres"]).output().unwrap();
            let uid: u32 = String::from_utf8_lossy(&pw.stdout).trim().parse().expect("a postgres user");
            std::os::unix::fs::chown(dir.path(), Some(uid), None).unwrap();
        }
        let data = dir.path().join("data");
        let out = as_postgres(&bin.join("initdb"))
            .args(["-D", data.to_str().unwrap(), "-A", "trust", "-U", "postgres", "--no-sync"])
            .output()
            .unwrap();
        assert!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
        let pg = Postgres { dir, bin, port: super::free_port() };
        pg.start_server();
        pg
    }

    fn pg_ctl(&self, args: &[&str]) -> std::process::Output {
        let data = self.dir.path().join("data");
        as_postgres(&self.bin.join("pg_ctl")).arg("-D").arg(&data).args(args).output().unwrap()
    }

    /// Starts (or restarts after [`Postgres::stop`]) the server and waits until it accepts connections.
    pub fn start_server(&self) {
        let options =
            format!("-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off", self.port, self.dir.path().display());
        let log = self.dir.path().join("server.log");
        let out = self.pg_ctl(&["-o", &options, "-l", log.to_str().unwrap(), "-w", "start"]);
        assert!(out.status.success(), "pg_ctl start: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Serves TCP clients over TLS only (plain ones are refused by pg_hba), with this PEM
    /// certificate and key; restarts the server.
    pub fn require_tls(&self, certificate: &str, key: &str) {
        use std::os::unix::fs::PermissionsExt;
        let data = self.dir.path().join("data");
        for (from, to) in [(certificate, "server.crt"), (key, "server.key")] {
            std::fs::copy(from, data.join(to)).unwrap();
            if unsafe { libc::geteuid() } == 0 {
                let out = Command::new("chown").arg("postgres").arg(data.join(to)).output().unwrap();
                assert!(out.status.success());
            }
        }
        std::fs::set_permissions(data.join("server.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
        let conf = data.join("postgresql.conf");
        let text = std::fs::read_to_string(&conf).unwrap() + "\nssl = on\n";
        std::fs::write(&conf, text).unwrap();
        let hba = "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n";
        std::fs::write(data.join("pg_hba.conf"), hba).unwrap();
        self.stop();
        self.start_server();
    }

    /// Stops the server at once, as a crash or an outage would.
    pub fn stop(&self) {
        let out = self.pg_ctl(&["-m", "immediate", "-w", "stop"]);
        assert!(out.status.success(), "pg_ctl stop: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// A new, empty database; its URL.
    pub fn fresh_database(&self, name: &str) -> String {
        let out = as_postgres(&self.bin.join("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres", "-d", "postgres", "-c"])
            .arg(format!("CREATE DATABASE {name}"))
            .output()
            .unwrap();
        assert!(out.status.success(), "createdb: {}", String::from_utf8_lossy(&out.stderr));
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.pg_ctl(&["-m", "immediate", "stop"]);
    }
}
