//! A throwaway PKI for the TLS tests, made with the openssl command: a CA, two nodes it signed
//! (`a` and `b`, each good as a TLS server and client for 127.0.0.1 and localhost), and a
//! self-signed stranger.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct TestPki {
    dir: PathBuf,
}

impl TestPki {
    pub fn make(dir: &Path) -> TestPki {
        super::require_tool("openssl");
        std::fs::create_dir_all(dir).unwrap();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl");
            assert!(out.status.success(), "openssl {args:?}: {}", super::output_text(&out));
        };
        let self_signed = |name: &str, subject: &str| {
            openssl(&[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.pem"),
                "-days",
                "3650",
                "-subj",
                subject,
            ])
        };
        self_signed("ca", "/CN=IDAICS test CA");
        self_signed("stranger", "/CN=stranger");
        std::fs::write(
            dir.join("node.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
        )
        .unwrap();
        for name in ["a", "b"] {
            openssl(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN=node-{name}"),
            ]);
            openssl(&[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{name}.pem"),
                "-days",
                "2",
                "-extfile",
                "node.ext",
            ]);
        }
        TestPki { dir: dir.to_path_buf() }
    }

    /// `expired.pem`, the CA's certificate for `a.key` that was valid on 1 January 2020 only
    /// (`openssl ca` sets dates; `x509 -req` cannot set them in the past).
    pub fn make_expired(&self) {
        let cnf = "[ca]\ndefault_ca = test\n[test]\ndir = .\ndatabase = index.txt\nnew_certs_dir = .\n\
                   serial = serial\ndefault_md = sha256\npolicy = any\nunique_subject = no\n[any]\ncommonName = supplied\n";
        std::fs::write(self.dir.join("ca.cnf"), cnf).unwrap();
        std::fs::write(self.dir.join("index.txt"), "").unwrap();
        std::fs::write(self.dir.join("serial"), "1000\n").unwrap();
        let out = Command::new("openssl")
            .args(["ca", "-batch", "-config", "ca.cnf", "-cert", "ca.pem", "-keyfile", "ca.key", "-in", "a.csr"])
            .args(["-out", "expired.pem", "-notext", "-startdate", "20200101000000Z", "-enddate", "20200102000000Z"])
            .current_dir(&self.dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "openssl ca: {}", super::output_text(&out));
    }

    /// A file of it (`ca.pem`, `a.key`, `b.pem`, `stranger.key`, ...), as a string for configurations.
    pub fn path(&self, name: &str) -> String {
        self.dir.join(name).to_str().unwrap().to_string()
    }
}
