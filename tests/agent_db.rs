//! The running agent and its finding log: rows written as series arrive, on the embedded SQLite
//! file and on a real PostgreSQL that goes down mid-stream; health, metrics and the findings API
//! over HTTP.

mod common;

use std::time::Duration;

use common::postgres::Postgres;
use common::{Agent, free_port, http_get as get, output_text, store_outcomes, wait_until};
use idaics::store::db::{Db, SeriesRow, Table};
use idaics::synthetic::{SeriesSpec, write_ct_series};

/// /metrics as Prometheus reads it: `promtool check metrics` (the Prometheus server's own checker)
/// must find nothing wrong with the exposition or its names, and prometheus-parse reads the samples
/// with the types their TYPE lines gave them.
fn scrape(http: u16) -> prometheus_parse::Scrape {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let (status, body) = get(http, "/metrics");
    assert_eq!(status, 200, "{body}");
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/test.sh installs it)");
    promtool.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(checked.status.success(), "promtool check metrics: {}\n{body}", output_text(&checked));
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap();
    for sample in &scrape.samples {
        // Histograms' _sum and _count lines are the only ones the parser leaves untyped.
        let untyped = matches!(sample.value, prometheus_parse::Value::Untyped(_));
        let histogram_part = ["_sum", "_count"].iter().any(|s| sample.metric.ends_with(s));
        assert!(!untyped || histogram_part, "{} has no TYPE", sample.metric);
    }
    scrape
}

/// The value of one series, written as in the exposition: `name{label="value",...}`; a
/// histogram's `_bucket` series is read from the parsed histogram by its `le`.
fn sample(scrape: &prometheus_parse::Scrape, series: &str) -> f64 {
    use prometheus_parse::Value;
    let (name, labels) = series.split_once('{').unwrap_or((series, "}"));
    let mut wanted: std::collections::BTreeMap<String, String> = labels
        .trim_end_matches('}')
        .split(',')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap();
            (k.to_string(), v.trim_matches('"').to_string())
        })
        .collect();
    let bucket = name.strip_suffix("_bucket").map(|family| (family, wanted.remove("le").unwrap()));
    let metric = bucket.as_ref().map_or(name, |(family, _)| family);
    let found = scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == metric
                && s.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect::<std::collections::BTreeMap<_, _>>()
                    == wanted
        })
        .unwrap_or_else(|| panic!("{series} not exported"));
    match (&found.value, bucket) {
        (Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v), None) => *v,
        (Value::Histogram(buckets), Some((_, le))) => {
            let le: f64 = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap() };
            buckets.iter().find(|b| b.less_than == le).unwrap_or_else(|| panic!("{series} not exported")).count
        }
        (value, _) => panic!("{series}: {value:?}"),
    }
}

/// A listing's body, parsed, once its status is 200.
fn listing(http: u16, path: &str) -> serde_json::Value {
    let (status, body) = get(http, path);
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

#[test]
fn embedded_database_metrics_and_api() {
    let tmp = tempfile::tempdir().unwrap();
    let series =
        write_ct_series(&tmp.path().join("in"), &SeriesSpec { slices: 12, size: 64, seed: 21, ..Default::default() })
            .unwrap();
    let http = free_port();
    let agent = Agent::start(&tmp.path().join("state"), &[("IDAICS_HTTP_PORT", &http.to_string())]);
    assert_eq!(get(http, "/healthz").0, 200);
    let out = agent.storescu(&[], &series.files);
    assert_eq!(store_outcomes(&out), (12, 0), "{}", output_text(&out));
    let url = format!("sqlite://{}", agent.state_dir.join("idaics.db").display());
    let rt = runtime();
    let db = rt.block_on(Db::connect(&url)).unwrap();
    wait_until("the series row", Duration::from_secs(15), || {
        rt.block_on(db.series_state(&series.series_uid)).unwrap().is_some()
    });
    assert_eq!(rt.block_on(db.series_state(&series.series_uid)).unwrap(), Some(("complete".into(), 1)));
    assert_eq!(rt.block_on(db.count(Table::Jobs)).unwrap(), 1);
    wait_until("the association rows", Duration::from_secs(5), || {
        rt.block_on(db.count(Table::Associations)).unwrap() >= 1
    });

    let samples = scrape(http);
    assert_eq!(sample(&samples, "idaics_instances_received_total"), 12.0);
    assert_eq!(sample(&samples, "idaics_series_total{state=\"complete\"}"), 1.0);
    assert!(sample(&samples, "idaics_bytes_received_total") > 12.0 * 64.0 * 64.0 * 2.0);
    assert_eq!(sample(&samples, "idaics_outbox_depth"), 0.0);
    assert_eq!(sample(&samples, "idaics_inference_seconds_count"), 0.0);
    assert_eq!(sample(&samples, "idaics_jobs_taken_over_total"), 0.0);
    assert_eq!(sample(&samples, "idaics_series_purged_total"), 0.0);

    let (status, body) = get(http, "/readyz");
    assert_eq!(status, 200, "{body}");
    let (status, body) = get(http, "/api/v1/findings?level=L4/L5&min_confidence=0.5");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"findings\":[]"), "{body}");
    assert_eq!(get(http, "/api/v1/findings?class=herniation").0, 400);
    assert_eq!(get(http, "/api/v1/findings?since=yesterday").0, 400);
    assert_eq!(get(http, "/api/v1/findings?colour=red").0, 400);
    let (status, body) = get(http, &format!("/api/v1/jobs?series={}", series.series_uid));
    assert_eq!(status, 200, "{body}");
    let listed: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(listed["jobs"].as_array().unwrap().len(), 1, "{body}");
    assert_eq!(listed["jobs"][0]["series_uid"], series.series_uid.as_str());
    assert_eq!(listed["jobs"][0]["revision"], 1);
    assert_eq!(listing(http, "/api/v1/jobs?series=1.2.3.4"), serde_json::json!({"jobs": [], "next_offset": null}));
    assert_eq!(get(http, "/api/v1/jobs?state=stuck").0, 400);
    assert_eq!(get(http, "/api/v1/jobs?colour=red").0, 400);
    // Why a series has (or has not) results, by what a person knows of it.
    let (status, body) = get(http, "/api/v1/series?accession=ACC21&patient=SYN21&state=complete");
    assert_eq!(status, 200, "{body}");
    let listed_series: serde_json::Value = serde_json::from_str(&body).unwrap();
    let found = listed_series["series"].as_array().unwrap();
    assert_eq!(found.len(), 1, "{body}");
    assert_eq!(found[0]["series_uid"], series.series_uid.as_str());
    assert_eq!(found[0]["slices"], 12);
    assert_eq!(found[0]["job_id"], listed["jobs"][0]["id"]);
    assert_eq!(listing(http, "/api/v1/series?patient=nobody"), serde_json::json!({"series": [], "next_offset": null}));
    assert_eq!(get(http, "/api/v1/series?state=purged").0, 400);
    assert_eq!(get(http, "/api/v1/series?colour=red").0, 400);
    // No destination: nothing to send.
    assert_eq!(listing(http, "/api/v1/outbox"), serde_json::json!({"outbox": [], "next_offset": null}));
    assert_eq!(get(http, "/api/v1/outbox?state=stuck").0, 400);

    // Listings come in pages (1000 rows unless `limit` says otherwise), each saying where the
    // next one starts. The job ends first, so that no page sees it in another state than the
    // whole listing it is compared with. A second series, as another agent sharing the database would record it:
    let other = SeriesRow {
        series_uid: "1.2.826.0.1.3680043.10.1".into(),
        study_uid: "1.2.826.0.1.3680043.10.2".into(),
        patient_id: Some("OTHER".into()),
        accession: None,
        study_date: None,
        body_part: None,
        modality: Some("CT".into()),
        instances: 1,
        slices: 1,
        state: "skipped".into(),
        skip_reason: Some("1 slice(s); a stack needs at least 2".into()),
        trigger_reason: "quiet period".into(),
        revision: 1,
        decided_at: idaics::store::db::now(),
    };
    rt.block_on(db.record_series(&other)).unwrap();
    common::wait_until("the job to end", std::time::Duration::from_secs(60), || {
        listing(http, "/api/v1/jobs")["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|j| j["state"] == "done" || j["state"] == "failed")
    });
    let whole = listing(http, "/api/v1/series");
    assert_eq!(whole["series"].as_array().unwrap().len(), 2, "{whole}");
    assert_eq!(whole["next_offset"], serde_json::Value::Null);
    let first = listing(http, "/api/v1/series?limit=1");
    assert_eq!(first["series"].as_array().unwrap()[..], whole["series"].as_array().unwrap()[..1]);
    assert_eq!(first["next_offset"], 1);
    let second = listing(http, "/api/v1/series?limit=1&offset=1");
    assert_eq!(second["series"].as_array().unwrap()[..], whole["series"].as_array().unwrap()[1..]);
    assert_eq!(second["next_offset"], serde_json::Value::Null);
    let skipped = listing(http, "/api/v1/series?state=skipped&limit=5");
    assert_eq!(skipped["series"][0]["series_uid"], other.series_uid.as_str());
    assert_eq!(listing(http, "/api/v1/jobs?offset=1")["jobs"], serde_json::json!([]));
    // A patient's history; a request without one, or with a name it does not take, is told so.
    let history = listing(http, "/api/v1/history?patient=SYN21");
    assert_eq!(history["patient"], "SYN21");
    for bad in ["", "?colour=red", "?patient=SYN21&colour=red"] {
        let (status, body) = get(http, &format!("/api/v1/history{bad}"));
        assert_eq!(status, 400, "{bad}: {body}");
        let error: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{bad}: {e}: {body}"));
        assert!(error["error"].as_str().unwrap().contains(if bad.is_empty() { "patient" } else { "colour" }), "{body}");
    }
    for bad in ["limit=0", "limit=10001", "limit=ten", "offset=-1", "limit="] {
        let (status, body) = get(http, &format!("/api/v1/findings?{bad}"));
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body.contains(bad.split('=').next().unwrap()), "{bad}: {body}");
    }

    // The CLI reads the same database.
    let cli = std::process::Command::new(env!("CARGO_BIN_EXE_idaics"))
        .args(["findings", "--state-dir"])
        .arg(&agent.state_dir)
        .args(["--format", "csv"])
        .output()
        .unwrap();
    assert!(cli.status.success(), "{}", String::from_utf8_lossy(&cli.stderr));
    assert!(String::from_utf8_lossy(&cli.stdout).starts_with("patient_id,study_date,"));
}

#[test]
fn postgres_outage_while_series_arrive_loses_no_row() {
    let pg = Postgres::start();
    let url = pg.fresh_database("agent_outage");
    let tmp = tempfile::tempdir().unwrap();
    let series: Vec<_> = (0..3)
        .map(|n| {
            write_ct_series(
                &tmp.path().join(format!("in{n}")),
                &SeriesSpec { slices: 8, size: 48, seed: 40 + n, ..Default::default() },
            )
            .unwrap()
        })
        .collect();
    let agent = Agent::start(&tmp.path().join("state"), &[("IDAICS_DATABASE_URL", url.as_str())]);
    let rt = runtime();
    let db = rt.block_on(Db::connect(&url)).unwrap();
    assert_eq!(store_outcomes(&agent.storescu(&[], &series[0].files)), (8, 0));
    wait_until("the first series row", Duration::from_secs(15), || {
        rt.block_on(db.series_state(&series[0].series_uid)).unwrap().is_some()
    });

    pg.stop();
    for s in &series[1..] {
        let out = agent.storescu(&[], &s.files);
        assert_eq!(store_outcomes(&out), (8, 0), "ingest must go on during the outage: {}", output_text(&out));
    }
    for s in &series[1..] {
        agent.wait_for("completion during the outage", Duration::from_secs(15), |a| {
            a.series_record(&s.study_uid, &s.series_uid).is_some()
        });
    }
    assert!(agent.echo());
    let journal = agent.state_dir.join(format!("db-pending-{}.jsonl", idaics::common::hostname()));
    wait_until("the journal", Duration::from_secs(20), || journal.exists());

    pg.start_server();
    wait_until("every row after the outage", Duration::from_secs(60), || {
        rt.block_on(db.count(Table::Series)).unwrap_or(0) == 3
    });
    assert_eq!(rt.block_on(db.count(Table::Jobs)).unwrap(), 3);
    for s in &series {
        assert_eq!(rt.block_on(db.series_state(&s.series_uid)).unwrap(), Some(("complete".into(), 1)));
    }
    // The three stores and the echo.
    wait_until("the association rows", Duration::from_secs(30), || {
        rt.block_on(db.count(Table::Associations)).unwrap_or(0) >= 4
    });
}

/// A reader reviews the running agent's findings: through the API (a confirmation, a
/// correction, and the refusals) and the CLI; `idaics findings --reviews` and `/metrics` show
/// how far the agent agrees with its readers.
#[test]
fn readers_review_findings_through_the_api_and_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = idaics::phantom::PhantomSpec {
        seed: 7501,
        levels: idaics::phantom::parse_levels("L4/L5=protrusion,L5/S1=schmorl").unwrap(),
        pixel_spacing_mm: 1.0,
        slice_thickness_mm: 2.0,
        size: 256,
        ..Default::default()
    };
    let (series, _) = idaics::phantom::write_phantom(&tmp.path().join("in"), &spec).unwrap();
    let http = free_port();
    let agent = Agent::start(
        &tmp.path().join("state"),
        &[
            ("IDAICS_HTTP_PORT", &http.to_string()),
            ("IDAICS_MODEL_WEIGHTS", common::PHANTOM_MODEL),
            ("IDAICS_MODEL_DEVICE", "cpu"),
        ],
    );
    assert_eq!(store_outcomes(&agent.storescu(&[], &series.files)).0, series.files.len());
    let mut findings = serde_json::Value::Null;
    wait_until("the findings", Duration::from_secs(180), || {
        findings = listing(http, "/api/v1/findings");
        findings["findings"].as_array().is_some_and(|f| f.len() == 6)
    });
    let finding =
        |level: &str| findings["findings"].as_array().unwrap().iter().find(|f| f["level"] == level).unwrap().clone();
    let (l4, l5) = (finding("L4/L5"), finding("L5/S1"));
    assert_eq!(l4["class"], "protrusion", "{findings}");
    let review =
        |id: &serde_json::Value, body: &str| common::http_post(http, &format!("/api/v1/findings/{id}/review"), body);
    let (status, body) = review(&l4["id"], r#"{"reviewer": "dr.first", "confirm": true}"#);
    assert_eq!(status, 201, "{body}");
    let written: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!((written["class"].as_str(), written["confirmed"].as_bool()), (Some("protrusion"), Some(true)));
    let (status, body) = review(&l5["id"], r#"{"reviewer": "dr.first", "class": "normal", "comment": "no node"}"#);
    assert_eq!(status, 201, "{body}");
    assert_eq!(review(&serde_json::json!(99999), r#"{"reviewer": "dr.first", "confirm": true}"#).0, 404);
    let (status, body) = review(&l4["id"], r#"{"reviewer": "dr.first", "class": "herniation"}"#);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("herniation"), "{body}");
    assert_eq!(review(&l4["id"], r#"{"reviewer": "dr.first", "colour": "red"}"#).0, 400);
    assert_eq!(review(&l4["id"], "not json").0, 400);

    // The CLI, on the same log: a second reader corrects the first.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_idaics"))
            .args(args)
            .arg("--state-dir")
            .arg(&agent.state_dir)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {text}");
        text
    };
    let id = l4["id"].to_string();
    let printed = cli(&["review", &id, "--class", "bulge", "--reviewer", "dr.second"]);
    assert!(printed.contains("corrected to bulge by dr.second"), "{printed}");
    let summary: serde_json::Value =
        serde_json::from_str(&cli(&["findings", "--reviews", "--format", "json"])).unwrap();
    assert_eq!(summary["reviews"].as_array().unwrap().len(), 3);
    // The latest review of each finding: L4/L5 corrected to bulge, L5/S1 to normal.
    assert_eq!(
        (summary["agreement"]["findings"].as_u64(), summary["agreement"]["agreed"].as_u64()),
        (Some(2), Some(0))
    );
    let table = cli(&["findings", "--reviews"]);
    assert!(table.contains("agreement: 0 of 2 reviewed findings kept"), "{table}");
    let samples = scrape(http);
    assert_eq!(sample(&samples, "idaics_reviewed_findings{agreed=\"false\"}"), 2.0);
    assert_eq!(sample(&samples, "idaics_reviewed_findings{agreed=\"true\"}"), 0.0);
    // The job's stages, timed: in /metrics and on its log line.
    for stage in idaics::pipeline::STAGES {
        assert_eq!(sample(&samples, &format!("idaics_stage_seconds_count{{stage=\"{stage}\"}}")), 1.0, "{stage}");
        assert_eq!(sample(&samples, &format!("idaics_stage_seconds_bucket{{stage=\"{stage}\",le=\"+Inf\"}}")), 1.0);
    }
    let done = agent.events("job done");
    let stages = done[0]["fields"]["stages"].as_str().unwrap_or_default().to_string();
    assert!(idaics::pipeline::STAGES.iter().all(|s| stages.contains(s)), "{done:?}");

    // The next training round: exactly the reviewed images, with the readers' classes. The
    // sagittal image shows unreviewed levels too, so it is left out.
    let export = tmp.path().join("reviewed");
    let printed = cli(&["dataset", "export", "--reviewed", "--out", export.to_str().unwrap()]);
    assert!(printed.contains("2 images"), "{printed}");
    let mut labels = Vec::new();
    for entry in std::fs::read_dir(&export).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            let review = &doc["idaics"]["reviews"][0];
            labels.push((
                doc["idaics"]["level"].as_str().unwrap().to_string(),
                doc["shapes"][0]["label"].as_str().unwrap().to_string(),
                review["reviewer"].as_str().unwrap().to_string(),
            ));
        }
    }
    // Every series analysed since a date, from the log and the spool.
    let recent = tmp.path().join("recent");
    let printed = cli(&["dataset", "export", "--since", "2000-01-01", "--out", recent.to_str().unwrap()]);
    assert!(printed.contains("7 images") && printed.contains("from 1 series"), "{printed}");
    let future = std::process::Command::new(env!("CARGO_BIN_EXE_idaics"))
        .args(["dataset", "export", "--since", "2999-01-01", "--out", recent.to_str().unwrap(), "--state-dir"])
        .arg(&agent.state_dir)
        .output()
        .unwrap();
    assert!(
        !future.status.success()
            && String::from_utf8_lossy(&future.stderr).contains("no series decided complete since")
    );
    labels.sort();
    assert_eq!(
        labels,
        [("L4/L5".into(), "bulge".into(), "dr.second".into()), ("L5/S1".into(), "normal".into(), "dr.first".into())]
    );
}
