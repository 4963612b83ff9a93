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
                "2",
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

    /// A file of it (`ca.pem`, `a.key`, `b.pem`, `stranger.key`, ...), as a string for configurations.
    pub fn path(&self, name: &str) -> String {
        self.dir.join(name).to_str().unwrap().to_string()
    }
}
