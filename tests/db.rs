//! The finding log on both backends: the same checks against a real PostgreSQL (a throwaway
//! cluster per test, see common/postgres.rs) and against the embedded SQLite file.

mod common;

use std::collections::HashSet;

use common::postgres::Postgres;
use idaics::store::db::{
    AssociationRow, Change, Db, DbError, FindingFilter, FindingRow, JobOutcome, OutboxEntry, Page, Record,
    SeriesFilter, SeriesRow, Table, Writer,
};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn series_row(uid: &str, patient: &str, study: &str, date: &str, state: &str, revision: i64) -> SeriesRow {
    SeriesRow {
        series_uid: uid.into(),
        study_uid: study.into(),
        patient_id: Some(patient.into()),
        accession: Some(format!("ACC-{study}")),
        study_date: Some(date.into()),
        body_part: Some("LSPINE".into()),
        modality: Some("CT".into()),
        instances: 120,
        slices: 120,
        state: state.into(),
        skip_reason: (state == "skipped").then(|| "localizer (scout) images".into()),
        trigger_reason: "association-released".into(),
        revision,
        decided_at: idaics::store::db::now(),
    }
}

fn association(key: &str) -> AssociationRow {
    AssociationRow {
        association_key: key.into(),
        agent: "test".into(),
        peer: "127.0.0.1:5000".into(),
        calling_ae: "STORESCU".into(),
        called_ae: "IDAICS".into(),
        started_at: idaics::store::db::now(),
        ended_at: idaics::store::db::now(),
        instances: 3,
        bytes: 1_500_000,
        discarded: 0,
        failed: 0,
        outcome: "released".into(),
        detail: None,
    }
}

async fn on_sqlite<F, Fut>(check: F)
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    check(format!("sqlite://{}", dir.path().join("idaics.db").display())).await;
}

/// Series decisions and associations are recorded; a complete series queues one job per
/// revision however often it is recorded; migrations run twice without harm.
async fn series_and_jobs(url: String) {
    let db = Db::connect(&url).await.unwrap();
    db.migrate().await.unwrap();
    db.migrate().await.unwrap();
    db.record_association(&association("a/1")).await.unwrap();
    db.record_association(&association("a/1")).await.unwrap(); // replayed: no duplicate
    assert_eq!(db.count(Table::Associations).await.unwrap(), 1);
    let first = db.record_series(&series_row("1.2.3", "P1", "9.1", "2026-01-01", "complete", 1)).await.unwrap();
    assert!(first.is_some());
    let again = db.record_series(&series_row("1.2.3", "P1", "9.1", "2026-01-01", "complete", 1)).await.unwrap();
    assert_eq!(again, None, "the same revision queues no second job");
    let reopened = db.record_series(&series_row("1.2.3", "P1", "9.1", "2026-01-01", "complete", 2)).await.unwrap();
    assert!(reopened.is_some(), "a new revision is analysed again");
    db.record_series(&series_row("1.2.4", "P1", "9.1", "2026-01-01", "skipped", 1)).await.unwrap();
    // An older revision arriving late does not overwrite the newer decision.
    db.record_series(&series_row("1.2.3", "P1", "9.1", "2026-01-01", "skipped", 1)).await.unwrap();
    assert_eq!(db.series_state("1.2.3").await.unwrap(), Some(("complete".into(), 2)));
    assert_eq!(db.count(Table::Series).await.unwrap(), 2);
    assert_eq!(db.count(Table::Jobs).await.unwrap(), 2);
}

/// Two agents sharing one database claim every job exactly once.
async fn two_agents_claim_each_job_once(url: String) {
    let db = Db::connect(&url).await.unwrap();
    db.migrate().await.unwrap();
    for n in 0..30 {
        db.record_series(&series_row(&format!("1.2.{n}"), "P1", "9.1", "2026-01-01", "complete", 1)).await.unwrap();
    }
    let claim_all = |name: &'static str| {
        let url = url.clone();
        tokio::spawn(async move {
            let db = Db::connect(&url).await.unwrap();
            let mut claimed = Vec::new();
            while let Some(job) = db.claim_job(name).await.unwrap() {
                assert_eq!(job.attempts, 1);
                claimed.push(job.id);
                let done = JobOutcome::Done { weights_sha256: Some("abc"), findings: &[], outbox: &[] };
                assert!(db.finish_job(job.id, name, done).await.unwrap());
            }
            claimed
        })
    };
    let (a, b) = (claim_all("agent-a"), claim_all("agent-b"));
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    let all: HashSet<i64> = a.iter().chain(&b).copied().collect();
    assert_eq!(a.len() + b.len(), 30, "a {a:?} b {b:?}");
    assert_eq!(all.len(), 30, "a job was claimed twice: a {a:?} b {b:?}");
}

fn finding(job: i64, study: &str, date: &str, level: &str, class: &str, confidence: f64) -> FindingRow {
    FindingRow {
        id: None,
        job_id: job,
        series_uid: format!("{study}.1"),
        study_uid: study.into(),
        patient_id: Some("P7".into()),
        accession: Some(format!("ACC-{study}")),
        study_date: Some(date.into()),
        level: level.into(),
        level_certain: Some(true),
        class: class.into(),
        confidence,
        views: vec!["sagittal".into(), "axial".into()],
        r#box: Some([10.0, 20.0, 110.0, 80.0]),
        mask_area_mm2: Some(f64::from(1_227.722_2_f32)),
        model_version: "test-1".into(),
        created_at: idaics::store::db::now(),
    }
}

/// Ends each job of `rows` as done with its findings, as the worker does.
async fn finish_with_findings(db: &Db, claimant: &str, rows: &[FindingRow]) {
    let mut jobs: Vec<i64> = rows.iter().map(|r| r.job_id).collect();
    jobs.dedup();
    for job in jobs {
        let findings: Vec<FindingRow> = rows.iter().filter(|r| r.job_id == job).cloned().collect();
        let done = JobOutcome::Done { weights_sha256: Some("abc"), findings: &findings, outbox: &[] };
        assert!(db.finish_job(job, claimant, done).await.unwrap(), "job {job} was not {claimant}'s");
    }
}

/// A host that dies with a job running never comes back to take it up: once its claim has gone
/// unrenewed for the lease, another agent takes the job over, and the first agent's late results
/// (its host was only cut off, and comes back) are refused whole, so each finding is logged once.
async fn lapsed_claims_are_taken_over_and_late_results_refused(url: String) {
    let db = Db::connect(&url).await.unwrap();
    db.migrate().await.unwrap();
    for uid in ["5.1", "5.2", "5.3"] {
        db.record_series(&series_row(uid, "P5", "5", "2026-01-01", "complete", 1)).await.unwrap();
    }
    let (gone, alive, taker) = ("host-a:/srv/idaics|run-1", "host-b:/srv/idaics|run-1", "host-c:/srv/idaics|run-1");
    let lost = db.claim_job(gone).await.unwrap().unwrap();
    // Claims are renewed by the second: the next claim is certainly younger.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let kept = db.claim_job(alive).await.unwrap().unwrap();
    assert!(db.renew_job(kept.id, alive).await.unwrap());
    assert!(!db.renew_job(kept.id, gone).await.unwrap(), "only the claimant renews");
    let lease_start = idaics::store::db::now();
    assert_eq!(db.take_over_stale_jobs("2000-01-01T00:00:00Z", 3).await.unwrap(), (0, 0), "nothing lapsed yet");
    assert_eq!(db.take_over_stale_jobs(&lease_start, 3).await.unwrap(), (1, 0), "only the older claim lapsed");
    assert_eq!(db.latest_job(&kept.series_uid).await.unwrap().unwrap().0, "running");

    // The job goes to the next claimant, as its second attempt.
    let again = db.claim_job(taker).await.unwrap().unwrap();
    assert_eq!((again.id, again.attempts), (lost.id, 2));
    // The first host comes back: it can neither renew nor record anything.
    assert!(!db.renew_job(lost.id, gone).await.unwrap());
    let late = [finding(lost.id, "5", "2026-01-01", "L4/L5", "bulge", 0.8)];
    let late_outbox = [OutboxEntry {
        destination: "PACS@pacs:104".into(),
        object_path: "/srv/idaics/outputs/5.1/SR.dcm".into(),
        sop_class_uid: "1.2.840.10008.5.1.4.1.1.88.34".into(),
        sop_instance_uid: "2.25.1".into(),
    }];
    let late_done = JobOutcome::Done { weights_sha256: Some("abc"), findings: &late, outbox: &late_outbox };
    assert!(!db.finish_job(lost.id, gone, late_done).await.unwrap());
    assert!(!db.finish_job(lost.id, gone, JobOutcome::Failed("late")).await.unwrap());
    assert_eq!(db.count(Table::Findings).await.unwrap(), 0);
    assert_eq!(db.outbox_depth().await.unwrap(), 0);
    // The agent that took it over records its results, findings and outbox together.
    let done = JobOutcome::Done { weights_sha256: Some("abc"), findings: &late, outbox: &late_outbox };
    assert!(db.finish_job(again.id, taker, done).await.unwrap());
    assert_eq!(db.count(Table::Findings).await.unwrap(), 1);
    assert_eq!(db.outbox_states("PACS@pacs:104").await.unwrap(), vec![("2.25.1".into(), "pending".into(), 0)]);
    assert_eq!(db.latest_job(&again.series_uid).await.unwrap().unwrap().0, "done");
    assert!(!db.finish_job(again.id, taker, JobOutcome::Failed("twice")).await.unwrap(), "a job ends once");

    // A job whose agent lapses on every attempt is given up after the last.
    let far_future = "9999-01-01T00:00:00Z";
    assert!(db.finish_job(kept.id, alive, JobOutcome::Failed("not this test's")).await.unwrap());
    let doomed = db.claim_job(gone).await.unwrap().unwrap();
    for attempt in 1..=3 {
        let expected = if attempt < 3 { (1, 0) } else { (0, 1) };
        assert_eq!(db.take_over_stale_jobs(far_future, 3).await.unwrap(), expected, "after attempt {attempt}");
        if attempt < 3 {
            assert_eq!(db.claim_job(gone).await.unwrap().unwrap().id, doomed.id);
        }
    }
    let (state, error) = db.latest_job(&doomed.series_uid).await.unwrap().unwrap();
    assert_eq!(state, "failed");
    assert!(error.unwrap().contains("stopped renewing its claim during each of 3 attempts"));
}

/// An operator lists jobs by state and series, and queues a failed job again once its cause is
/// dealt with; a done job is never run twice that way.
async fn failed_jobs_are_listed_and_queued_again(url: String) {
    let db = Db::connect(&url).await.unwrap();
    db.migrate().await.unwrap();
    for uid in ["6.1", "6.2"] {
        db.record_series(&series_row(uid, "P6", "6", "2026-01-01", "complete", 1)).await.unwrap();
    }
    let failing = db.claim_job("a|1").await.unwrap().unwrap();
    let succeeding = db.claim_job("a|1").await.unwrap().unwrap();
    assert!(db.finish_job(failing.id, "a|1", JobOutcome::Failed("series larger than 1 MB")).await.unwrap());
    let done = JobOutcome::Done { weights_sha256: None, findings: &[], outbox: &[] };
    assert!(db.finish_job(succeeding.id, "a|1", done).await.unwrap());

    let all = db.jobs(None, None, Page::ALL).await.unwrap();
    assert_eq!(all.iter().map(|j| j.id).collect::<Vec<_>>(), vec![succeeding.id, failing.id], "newest first");
    let failed = db.jobs(Some("failed"), None, Page::ALL).await.unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!((failed[0].id, failed[0].attempts), (failing.id, 1));
    assert_eq!(failed[0].error.as_deref(), Some("series larger than 1 MB"));
    assert_eq!(failed[0].claimed_by.as_deref(), Some("a|1"));
    assert!(failed[0].finished_at.is_some());
    assert_eq!(db.jobs(None, Some("6.2"), Page::ALL).await.unwrap()[0].state, "done");
    assert!(db.jobs(Some("running"), None, Page::ALL).await.unwrap().is_empty());

    assert!(!db.retry_failed_job(succeeding.id).await.unwrap(), "a done job is not run again");
    assert!(!db.retry_failed_job(999_999).await.unwrap());
    assert!(db.retry_failed_job(failing.id).await.unwrap());
    assert!(!db.retry_failed_job(failing.id).await.unwrap(), "already queued");
    let queued = db.jobs(Some("queued"), Some("6.1"), Page::ALL).await.unwrap();
    assert_eq!(queued.len(), 1);
    assert_eq!((queued[0].attempts, queued[0].error.as_deref(), queued[0].finished_at.as_deref()), (0, None, None));
    let again = db.claim_job("b|1").await.unwrap().unwrap();
    assert_eq!((again.id, again.attempts), (failing.id, 1), "a fresh count of attempts");
}

/// The series log answers "why has this study no results?": a skipped series with its reason,
/// a complete one with its latest job (a failed one with its error), found by patient, accession,
/// study or decision.
async fn the_series_log_says_what_became_of_each_series(url: String) {
    let db = Db::connect(&url).await.unwrap();
    db.migrate().await.unwrap();
    db.record_series(&series_row("7.1", "P7", "7", "2026-02-01", "complete", 1)).await.unwrap();
    db.record_series(&series_row("7.2", "P7", "7", "2026-02-01", "skipped", 1)).await.unwrap();
    db.record_series(&series_row("8.1", "P8", "8", "2026-02-02", "complete", 1)).await.unwrap();
    let job = db.claim_job("a|1").await.unwrap().unwrap();
    assert_eq!(job.series_uid, "7.1");
    assert!(db.finish_job(job.id, "a|1", JobOutcome::Failed("no disc level found")).await.unwrap());

    let listed = |filter: SeriesFilter| {
        let db = db.clone();
        async move {
            let mut rows = db.series_log(&filter, Page::ALL).await.unwrap();
            rows.sort_by(|a, b| a.series.series_uid.cmp(&b.series.series_uid));
            rows
        }
    };
    let all = listed(SeriesFilter::default()).await;
    assert_eq!(all.iter().map(|r| r.series.series_uid.as_str()).collect::<Vec<_>>(), ["7.1", "7.2", "8.1"]);
    let failed = &all[0];
    assert_eq!((failed.job_id, failed.job_state.as_deref()), (Some(job.id), Some("failed")));
    assert_eq!(failed.job_error.as_deref(), Some("no disc level found"));
    let skipped = &all[1];
    assert_eq!(skipped.series.skip_reason.as_deref(), Some("localizer (scout) images"));
    assert_eq!((skipped.job_id, skipped.job_state.as_deref()), (None, None));
    assert_eq!(all[2].job_state.as_deref(), Some("queued"));
    assert!(all.iter().all(|r| r.purged_at.is_none()));

    let by = |state: Option<&str>, patient: Option<&str>, accession: Option<&str>, study: Option<&str>| SeriesFilter {
        state: state.map(String::from),
        patient: patient.map(String::from),
        accession: accession.map(String::from),
        study: study.map(String::from),
    };
    let uids =
        |rows: Vec<idaics::store::db::SeriesLogRow>| rows.into_iter().map(|r| r.series.series_uid).collect::<Vec<_>>();
    assert_eq!(uids(listed(by(Some("skipped"), None, None, None)).await), ["7.2"]);
    assert_eq!(uids(listed(by(None, Some("P7"), None, None)).await), ["7.1", "7.2"]);
    assert_eq!(uids(listed(by(None, None, Some("ACC-8"), None)).await), ["8.1"]);
    assert_eq!(uids(listed(by(Some("complete"), Some("P7"), None, Some("7"))).await), ["7.1"]);
    assert!(listed(by(None, Some("P9"), None, None)).await.is_empty());
    let refused = db.series_log(&by(Some("purged"), None, None, None), Page::ALL).await;
    assert!(matches!(refused, Err(DbError::Filter(_))), "{refused:?}");

    // Sent again, the series is decided again: its new job is the one listed.
    db.record_series(&series_row("7.1", "P7", "7", "2026-02-01", "complete", 2)).await.unwrap();
    let again = &listed(by(None, None, None, Some("7"))).await[0];
    assert_eq!(
        (again.series.revision, again.job_state.as_deref(), again.job_error.as_deref()),
        (2, Some("queued"), None)
    );
    assert_ne!(again.job_id, Some(job.id));
}

/// Retention takes only series that are finished and delivered: skipped, or analysed (done or
/// failed) with nothing left in the outbox, decided before the cut-off and not purged yet; a
/// series decided again after its purge comes back once its new revision is finished.
async fn retention_takes_only_finished_and_delivered_series(url: String) {
    let db = Db::connect(&url).await.unwrap();
    db.migrate().await.unwrap();
    let cutoff = "2026-06-01T00:00:00Z";
    let old = |uid: &str, state: &str, revision: i64| SeriesRow {
        decided_at: "2026-05-01T00:00:00Z".into(),
        ..series_row(uid, "P8", "8", "2026-05-01", state, revision)
    };
    // done; failed; skipped; done with an object still to deliver; queued; running; and one
    // decided after the cut-off.
    for uid in ["8.1", "8.2", "8.4", "8.5", "8.6"] {
        db.record_series(&old(uid, "complete", 1)).await.unwrap();
    }
    db.record_series(&old("8.3", "skipped", 1)).await.unwrap();
    db.record_series(&series_row("8.7", "P8", "8", "2026-05-01", "complete", 1)).await.unwrap();
    let entry = |uid: &str| OutboxEntry {
        destination: "PACS@pacs:104".into(),
        object_path: format!("/srv/idaics/outputs/{uid}/SR.dcm"),
        sop_class_uid: "1.2.840.10008.5.1.4.1.1.88.34".into(),
        sop_instance_uid: format!("2.25.{}", uid.replace('.', "")),
    };
    let (sent, pending) = ([entry("8.1")], [entry("8.4")]);
    let done = |outbox| JobOutcome::Done { weights_sha256: None, findings: &[], outbox };
    let job_81 = db.claim_job("a|1").await.unwrap().unwrap();
    assert!(db.finish_job(job_81.id, "a|1", done(&sent)).await.unwrap());
    let sent_item = db.due_outbox("PACS@pacs:104", 10).await.unwrap();
    db.outbox_sent(sent_item[0].id, "0x0000").await.unwrap();
    let job_82 = db.claim_job("a|1").await.unwrap().unwrap();
    assert!(db.finish_job(job_82.id, "a|1", JobOutcome::Failed("no spine")).await.unwrap());
    let job_84 = db.claim_job("a|1").await.unwrap().unwrap();
    assert!(db.finish_job(job_84.id, "a|1", done(&pending)).await.unwrap());
    let _job_85_running = db.claim_job("a|1").await.unwrap().unwrap();
    // 8.6 stays queued, 8.7 is recent.
    let due = |db: Db| async move {
        db.series_past_retention(cutoff).await.unwrap().into_iter().map(|s| s.series_uid).collect::<Vec<_>>()
    };
    let mut listed = due(db.clone()).await;
    listed.sort();
    assert_eq!(listed, ["8.1", "8.2", "8.3"]);

    // The operator's view of the outbox (`idaics outbox`): one object sent, one pending.
    // Cancelling the pending one lets its series go; a retry makes it due, and holds it again.
    let outbox = db.outbox(None, None, Page::ALL).await.unwrap();
    let listed_outbox: Vec<_> = outbox.iter().map(|o| (o.series_uid.as_deref(), o.state.as_str())).collect();
    assert_eq!(listed_outbox, [(Some("8.4"), "pending"), (Some("8.1"), "sent")]);
    assert!(outbox[0].next_attempt_at.is_some() && outbox[1].next_attempt_at.is_none());
    let (pending_id, sent_id) = (outbox[0].id, outbox[1].id);
    assert_eq!(db.outbox(Some("pending"), Some("8.4"), Page::ALL).await.unwrap().len(), 1);
    assert!(db.outbox(Some("pending"), Some("8.1"), Page::ALL).await.unwrap().is_empty());
    assert!(!db.cancel_outbox(sent_id).await.unwrap(), "a sent object stays sent");
    assert!(!db.retry_outbox(sent_id).await.unwrap(), "a sent object stays sent");
    assert!(db.cancel_outbox(pending_id).await.unwrap());
    assert!(!db.cancel_outbox(pending_id).await.unwrap(), "cancelled once");
    assert_eq!(db.outbox_depth().await.unwrap(), 0);
    assert!(db.due_outbox("PACS@pacs:104", 10).await.unwrap().is_empty());
    let mut listed = due(db.clone()).await;
    listed.sort();
    assert_eq!(listed, ["8.1", "8.2", "8.3", "8.4"]);
    assert!(db.retry_outbox(pending_id).await.unwrap());
    assert_eq!(db.due_outbox("PACS@pacs:104", 10).await.unwrap().len(), 1, "due at once");
    let mut listed = due(db.clone()).await;
    listed.sort();
    assert_eq!(listed, ["8.1", "8.2", "8.3"]);

    for series in db.series_past_retention(cutoff).await.unwrap() {
        db.mark_series_purged(&series).await.unwrap();
    }
    assert!(due(db.clone()).await.is_empty(), "purged once");
    // 8.1 is sent again: a new revision, listed again once its job is done.
    db.record_series(&old("8.1", "complete", 2)).await.unwrap();
    assert!(due(db.clone()).await.is_empty(), "its new job is queued");
    let again = loop {
        // The older queued jobs (8.6, 8.7) come first; they stay running.
        let job = db.claim_job("a|1").await.unwrap().unwrap();
        if job.series_uid == "8.1" {
            break job;
        }
    };
    assert_eq!(again.revision, 2);
    assert!(db.finish_job(again.id, "a|1", done(&[])).await.unwrap());
    assert_eq!(due(db.clone()).await, ["8.1"]);
}

/// Jobs left running by an agent that stopped: its workplace's are queued again at its next
/// start, another workplace's are not touched, and a job interrupted on every attempt is given up.
async fn interrupted_jobs_are_queued_again_then_given_up(url: String) {
    let db = Db::connect(&url).await.unwrap();
    db.migrate().await.unwrap();
    db.record_series(&series_row("7.1", "P1", "7", "2026-01-01", "complete", 1)).await.unwrap();
    db.record_series(&series_row("7.2", "P2", "8", "2026-01-01", "complete", 1)).await.unwrap();
    let here = "host:/var/lib/idaics|";
    let mine = db.claim_job(&format!("{here}run-1")).await.unwrap().unwrap();
    let theirs = db.claim_job("host:/var/lib/idaics-2|run-1").await.unwrap().unwrap();
    assert_eq!((mine.series_uid.as_str(), theirs.series_uid.as_str()), ("7.1", "7.2"));

    for attempt in 1..=3 {
        let expected = if attempt < 3 { (1, 0) } else { (0, 1) };
        assert_eq!(db.recover_interrupted_jobs(here, 3).await.unwrap(), expected, "after attempt {attempt}");
        if attempt < 3 {
            let again = db.claim_job(&format!("{here}run-{}", attempt + 1)).await.unwrap().unwrap();
            assert_eq!((again.id, again.attempts), (mine.id, attempt + 1));
        }
    }
    let (state, error) = db.latest_job("7.1").await.unwrap().unwrap();
    assert_eq!(state, "failed");
    assert!(error.unwrap().contains("stopped during each of 3 attempts"));
    // The other workplace's job is still running, and nothing is left to claim.
    assert_eq!(db.latest_job("7.2").await.unwrap().unwrap().0, "running");
    assert!(db.claim_job(&format!("{here}run-4")).await.unwrap().is_none());
}

/// Three studies of one patient; each filter, and the follow-up view.
async fn queries_and_history(url: String) {
    let db = Db::connect(&url).await.unwrap();
    db.migrate().await.unwrap();
    let mut job_ids = Vec::new();
    for (n, (study, date)) in [("9.1", "2024-03-01"), ("9.2", "2025-03-01"), ("9.3", "2026-03-01")].iter().enumerate() {
        db.record_series(&series_row(&format!("{study}.1"), "P7", study, date, "complete", 1)).await.unwrap();
        job_ids.push(db.claim_job("t").await.unwrap().unwrap().id);
        let _ = n;
    }
    // L4/L5: bulge, bulge, protrusion. L5/S1: normal, schmorl, normal. L3/L4: only in the last.
    let rows = vec![
        finding(job_ids[0], "9.1", "2024-03-01", "L4/L5", "bulge", 0.81),
        finding(job_ids[0], "9.1", "2024-03-01", "L5/S1", "normal", 0.95),
        finding(job_ids[1], "9.2", "2025-03-01", "L4/L5", "bulge", 0.77),
        finding(job_ids[1], "9.2", "2025-03-01", "L5/S1", "schmorl", 0.66),
        finding(job_ids[2], "9.3", "2026-03-01", "L4/L5", "protrusion", 0.91),
        finding(job_ids[2], "9.3", "2026-03-01", "L5/S1", "normal", 0.88),
        finding(job_ids[2], "9.3", "2026-03-01", "L3/L4", "undetermined", 0.0),
    ];
    finish_with_findings(&db, "t", &rows).await;
    let count = |filter: FindingFilter| {
        let db = db.clone();
        async move { db.findings(&filter, Page::ALL).await.unwrap().len() }
    };
    assert_eq!(count(FindingFilter::default()).await, 7);
    assert_eq!(count(FindingFilter { patient: Some("P7".into()), ..Default::default() }).await, 7);
    assert_eq!(count(FindingFilter { patient: Some("nobody".into()), ..Default::default() }).await, 0);
    assert_eq!(count(FindingFilter { accession: Some("ACC-9.2".into()), ..Default::default() }).await, 2);
    assert_eq!(count(FindingFilter { study: Some("9.3".into()), ..Default::default() }).await, 3);
    assert_eq!(count(FindingFilter { level: Some("L4/L5".into()), ..Default::default() }).await, 3);
    assert_eq!(count(FindingFilter { class: Some("bulge".into()), ..Default::default() }).await, 2);
    assert_eq!(count(FindingFilter { since: Some("2025-01-01".into()), ..Default::default() }).await, 5);
    assert_eq!(count(FindingFilter { until: Some("2025-03-01".into()), ..Default::default() }).await, 4);
    assert_eq!(count(FindingFilter { min_confidence: Some(0.8), ..Default::default() }).await, 4);
    let combined = FindingFilter {
        level: Some("L4/L5".into()),
        since: Some("2025-01-01".into()),
        min_confidence: Some(0.8),
        ..Default::default()
    };
    let found = db.findings(&combined, Page::ALL).await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].class, "protrusion");
    assert_eq!(found[0].r#box, Some([10.0, 20.0, 110.0, 80.0]));
    assert_eq!(found[0].views, vec!["sagittal", "axial"]);
    // Pages of a listing, in its order, add up to the whole of it.
    let all = db.findings(&FindingFilter::default(), Page::ALL).await.unwrap();
    let mut paged = Vec::new();
    for offset in [0, 3, 6] {
        paged.extend(db.findings(&FindingFilter::default(), Page { limit: Some(3), offset }).await.unwrap());
    }
    assert_eq!(paged, all);
    assert!(db.findings(&FindingFilter::default(), Page { limit: Some(3), offset: 7 }).await.unwrap().is_empty());
    assert_eq!(db.findings(&FindingFilter::default(), Page { limit: None, offset: 5 }).await.unwrap(), all[5..]);
    let by_level = FindingFilter { level: Some("L5/S1".into()), ..Default::default() };
    assert_eq!(db.findings(&by_level, Page { limit: Some(2), offset: 1 }).await.unwrap().len(), 2);
    let jobs = db.jobs(None, None, Page::ALL).await.unwrap();
    assert_eq!(jobs.len(), 3);
    assert_eq!(db.jobs(None, None, Page { limit: Some(2), offset: 1 }).await.unwrap(), jobs[1..]);
    assert!(
        db.findings(&FindingFilter { class: Some("herniation".into()), ..Default::default() }, Page::ALL)
            .await
            .is_err()
    );
    assert!(
        db.findings(&FindingFilter { since: Some("01/02/2025".into()), ..Default::default() }, Page::ALL)
            .await
            .is_err()
    );

    let history = db.history("P7").await.unwrap();
    let of = |level: &str| -> Vec<(String, Change)> {
        history.iter().filter(|h| h.level == level).map(|h| (h.class.clone(), h.change)).collect()
    };
    assert_eq!(
        of("L4/L5"),
        vec![
            ("bulge".into(), Change::First),
            ("bulge".into(), Change::Unchanged),
            ("protrusion".into(), Change::ChangedClass)
        ]
    );
    assert_eq!(
        of("L5/S1"),
        vec![("normal".into(), Change::First), ("schmorl".into(), Change::New), ("normal".into(), Change::Resolved)]
    );
    assert_eq!(of("L3/L4"), vec![("undetermined".into(), Change::First)]);
}

#[test]
fn series_and_jobs_on_sqlite() {
    runtime().block_on(on_sqlite(series_and_jobs));
}

#[test]
fn series_and_jobs_on_postgres() {
    let pg = Postgres::start();
    runtime().block_on(series_and_jobs(pg.fresh_database("series_and_jobs")));
}

#[test]
fn two_agents_claim_each_job_once_on_sqlite() {
    runtime().block_on(on_sqlite(two_agents_claim_each_job_once));
}

#[test]
fn two_agents_claim_each_job_once_on_postgres() {
    let pg = Postgres::start();
    runtime().block_on(two_agents_claim_each_job_once(pg.fresh_database("claims")));
}

#[test]
fn queries_and_history_on_sqlite() {
    runtime().block_on(on_sqlite(queries_and_history));
}

#[test]
fn queries_and_history_on_postgres() {
    let pg = Postgres::start();
    runtime().block_on(queries_and_history(pg.fresh_database("queries")));
}

/// PostgreSQL goes down while records arrive: they are kept (in memory and in the journal) and
/// written, in order and without loss, once it is back; a writer that crashed with a journal
/// replays it at its next start.
#[test]
fn records_survive_a_postgres_outage() {
    let pg = Postgres::start();
    let url = pg.fresh_database("outage");
    let state = tempfile::tempdir().unwrap();
    let rt = runtime();
    rt.block_on(async {
        let db = Db::connect(&url).await.unwrap();
        db.migrate().await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let writer = tokio::spawn(Writer::new(db.clone(), state.path(), "test-host").run(rx));
        tx.send(Record::Association(association("before"))).unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        assert_eq!(db.count(Table::Associations).await.unwrap(), 1);

        pg.stop();
        for n in 0..10 {
            tx.send(Record::Series(series_row(&format!("1.9.{n}"), "P1", "9.9", "2026-02-02", "complete", 1))).unwrap();
            tx.send(Record::Association(association(&format!("during/{n}")))).unwrap();
        }
        let journal = state.path().join("db-pending-test-host.jsonl");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !journal.exists() {
            assert!(std::time::Instant::now() < deadline, "no journal written during the outage");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        pg.start_server();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let series = db.count(Table::Series).await.unwrap_or(0);
            if series == 10 && !journal.exists() {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{series} series rows after the outage");
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        assert_eq!(db.count(Table::Associations).await.unwrap(), 11);
        assert_eq!(db.count(Table::Jobs).await.unwrap(), 10);
        drop(tx);
        writer.await.unwrap();

        // A journal left behind (as after a crash during an outage) is replayed at start.
        let leftover = Record::Association(association("left-by-a-crash"));
        std::fs::write(&journal, serde_json::to_string(&leftover).unwrap() + "\n").unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let writer = tokio::spawn(Writer::new(db.clone(), state.path(), "test-host").run(rx));
        drop(tx);
        writer.await.unwrap();
        assert_eq!(db.count(Table::Associations).await.unwrap(), 12);
        assert!(!journal.exists());
    });
}

/// `idaics findings` over the embedded database: each filter flag and each output format, and
/// the history view, as an administrator runs them.
#[test]
fn findings_command_filters_and_formats() {
    let state = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", state.path().join("idaics.db").display());
    runtime().block_on(async {
        let db = Db::connect(&url).await.unwrap();
        db.migrate().await.unwrap();
        let mut jobs = Vec::new();
        for (study, date) in [("9.1", "2024-03-01"), ("9.2", "2025-03-01"), ("9.3", "2026-03-01")] {
            db.record_series(&series_row(&format!("{study}.1"), "P7", study, date, "complete", 1)).await.unwrap();
            jobs.push(db.claim_job("t").await.unwrap().unwrap().id);
        }
        let rows = [
            finding(jobs[0], "9.1", "2024-03-01", "L4/L5", "bulge", 0.81),
            finding(jobs[1], "9.2", "2025-03-01", "L4/L5", "bulge", 0.77),
            finding(jobs[2], "9.3", "2026-03-01", "L4/L5", "protrusion", 0.91),
            finding(jobs[2], "9.3", "2026-03-01", "L5/S1", "normal", 0.88),
        ];
        finish_with_findings(&db, "t", &rows).await;
    });
    let run = |args: &[&str]| -> String {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_idaics"))
            .arg("findings")
            .arg("--state-dir")
            .arg(state.path())
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let json = |args: &[&str]| -> usize {
        let mut all = args.to_vec();
        all.extend(["--format", "json"]);
        let v: serde_json::Value = serde_json::from_str(&run(&all)).unwrap();
        v["findings"].as_array().unwrap().len()
    };
    assert_eq!(json(&[]), 4);
    assert_eq!(json(&["--patient", "P7"]), 4);
    assert_eq!(json(&["--accession", "ACC-9.3"]), 2);
    assert_eq!(json(&["--study", "9.2"]), 1);
    assert_eq!(json(&["--level", "L5/S1"]), 1);
    assert_eq!(json(&["--class", "bulge"]), 2);
    assert_eq!(json(&["--since", "2025-01-01"]), 3);
    assert_eq!(json(&["--until", "2024-12-31"]), 1);
    assert_eq!(json(&["--min-confidence", "0.85"]), 2);
    let csv = run(&["--level", "L4/L5", "--format", "csv"]);
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 4, "{csv}");
    assert!(lines[0].starts_with("patient_id,study_date,accession,level,level_certain,class,confidence"));
    assert!(lines[3].contains("P7,2026-03-01,ACC-9.3,L4/L5,true,protrusion,0.910,sagittal+axial,1227.7,"), "{csv}");
    let table = run(&["--class", "protrusion"]);
    assert!(table.lines().next().unwrap().starts_with("patient_id"), "{table}");
    assert!(table.contains("protrusion"), "{table}");
    let history = run(&["--patient", "P7", "--history"]);
    assert!(
        history.contains("changed_class") && history.contains("unchanged") && history.contains("first"),
        "{history}"
    );
    // Printed row by row, the JSON is still serde_json's pretty form of the whole listing.
    let listed = runtime().block_on(async {
        Db::connect(&url).await.unwrap().findings(&FindingFilter::default(), Page::ALL).await.unwrap()
    });
    let whole = serde_json::to_string_pretty(&serde_json::json!({ "findings": listed })).unwrap();
    assert_eq!(run(&["--format", "json"]), whole + "\n");
    assert_eq!(run(&["--study", "none", "--format", "json"]), "{\n  \"findings\": []\n}\n");
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_idaics"))
        .args(["findings", "--state-dir"])
        .arg(state.path())
        .args(["--class", "herniation"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("herniation"));
}

/// `idaics findings | head`: the listing streams, and a reader that stops early ends it
/// quietly, with success, rather than with a panic about a broken pipe.
#[test]
fn a_listing_read_only_in_part_ends_quietly() {
    use std::io::BufRead as _;
    let state = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", state.path().join("idaics.db").display());
    runtime().block_on(async {
        let db = Db::connect(&url).await.unwrap();
        db.migrate().await.unwrap();
        db.record_series(&series_row("9.1.1", "P7", "9.1", "2024-03-01", "complete", 1)).await.unwrap();
        let job = db.claim_job("t").await.unwrap().unwrap().id;
        // Far more than a pipe holds (64 KiB), so the writer meets the closed end.
        let rows: Vec<FindingRow> =
            (0..5000).map(|_| finding(job, "9.1", "2024-03-01", "L4/L5", "bulge", 0.5)).collect();
        finish_with_findings(&db, "t", &rows).await;
    });
    for format in ["csv", "json", "table"] {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_idaics"))
            .args(["findings", "--format", format, "--state-dir"])
            .arg(state.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
        assert!(!first.is_empty(), "{format}: nothing printed");
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{format}: {:?} {stderr}", out.status);
        assert!(!stderr.contains("panicked"), "{format}: {stderr}");
    }
}

#[test]
fn interrupted_jobs_are_queued_again_then_given_up_on_sqlite() {
    runtime().block_on(on_sqlite(interrupted_jobs_are_queued_again_then_given_up));
}

#[test]
fn interrupted_jobs_are_queued_again_then_given_up_on_postgres() {
    let pg = Postgres::start();
    runtime().block_on(interrupted_jobs_are_queued_again_then_given_up(pg.fresh_database("interrupted_jobs")));
}

#[test]
fn lapsed_claims_are_taken_over_and_late_results_refused_on_sqlite() {
    runtime().block_on(on_sqlite(lapsed_claims_are_taken_over_and_late_results_refused));
}

#[test]
fn lapsed_claims_are_taken_over_and_late_results_refused_on_postgres() {
    let pg = Postgres::start();
    runtime().block_on(lapsed_claims_are_taken_over_and_late_results_refused(pg.fresh_database("lapsed_claims")));
}

#[test]
fn the_series_log_says_what_became_of_each_series_on_sqlite() {
    runtime().block_on(on_sqlite(the_series_log_says_what_became_of_each_series));
}

#[test]
fn the_series_log_says_what_became_of_each_series_on_postgres() {
    let pg = Postgres::start();
    runtime().block_on(the_series_log_says_what_became_of_each_series(pg.fresh_database("series_log")));
}

#[test]
fn failed_jobs_are_listed_and_queued_again_on_sqlite() {
    runtime().block_on(on_sqlite(failed_jobs_are_listed_and_queued_again));
}

#[test]
fn failed_jobs_are_listed_and_queued_again_on_postgres() {
    let pg = Postgres::start();
    runtime().block_on(failed_jobs_are_listed_and_queued_again(pg.fresh_database("failed_jobs")));
}

#[test]
fn retention_takes_only_finished_and_delivered_series_on_sqlite() {
    runtime().block_on(on_sqlite(retention_takes_only_finished_and_delivered_series));
}

#[test]
fn retention_takes_only_finished_and_delivered_series_on_postgres() {
    let pg = Postgres::start();
    runtime().block_on(retention_takes_only_finished_and_delivered_series(pg.fresh_database("retention")));
}

/// Readers' reviews: a confirmation and a correction recorded with who and when, the latest
/// review of a finding counting, refusals with their reasons, and the agent's agreement with
/// its readers as a confusion matrix and kappa.
async fn reviews(url: String) {
    let db = Db::connect(&url).await.unwrap();
    db.migrate().await.unwrap();
    db.record_series(&series_row("8.1.1", "P8", "8.1", "2026-01-05", "complete", 1)).await.unwrap();
    let job = db.claim_job("t").await.unwrap().unwrap().id;
    let rows = vec![
        finding(job, "8.1", "2026-01-05", "L3/L4", "normal", 0.9),
        finding(job, "8.1", "2026-01-05", "L4/L5", "bulge", 0.8),
        finding(job, "8.1", "2026-01-05", "L5/S1", "protrusion", 0.7),
        finding(job, "8.1", "2026-01-05", "L2/L3", "undetermined", 0.0),
    ];
    finish_with_findings(&db, "t", &rows).await;
    let logged = db.findings(&FindingFilter::default(), Page::ALL).await.unwrap();
    let id_of = |level: &str| logged.iter().find(|f| f.level == level).unwrap().id.unwrap();
    let review = |class: Option<&str>, confirm: bool| idaics::store::db::NewReview {
        reviewer: "dr.reader".into(),
        class: class.map(String::from),
        confirm,
        comment: Some("checked on the axial".into()),
    };
    let confirmed = db.record_review(id_of("L3/L4"), &review(None, true)).await.unwrap();
    assert_eq!((confirmed.class.as_str(), confirmed.confirmed, confirmed.level.as_str()), ("normal", true, "L3/L4"));
    assert_eq!(confirmed.reviewer, "dr.reader");
    let corrected = db.record_review(id_of("L4/L5"), &review(Some("protrusion"), false)).await.unwrap();
    assert_eq!(
        (corrected.class.as_str(), corrected.agent_class.as_str(), corrected.confirmed),
        ("protrusion", "bulge", false)
    );
    // Reviewed again: the latest counts.
    db.record_review(id_of("L5/S1"), &review(Some("bulge"), false)).await.unwrap();
    db.record_review(id_of("L5/S1"), &review(None, true)).await.unwrap();
    // An undetermined finding gets a class but no agreement.
    db.record_review(id_of("L2/L3"), &review(Some("schmorl"), false)).await.unwrap();
    assert_eq!(db.reviews().await.unwrap().len(), 5);
    assert_eq!(db.count(idaics::store::db::Table::Reviews).await.unwrap(), 5);
    let agreement = db.review_agreement().await.unwrap();
    assert_eq!((agreement.total(), agreement.correct()), (3, 2));
    assert!(agreement.kappa().unwrap() > 0.0);
    // Refused, saying why.
    let refused = |r: Result<idaics::store::db::ReviewRow, idaics::store::db::DbError>| r.unwrap_err().to_string();
    assert!(refused(db.record_review(9999, &review(None, true)).await).contains("no finding 9999"));
    assert!(
        refused(db.record_review(id_of("L3/L4"), &review(Some("herniated"), false)).await).contains("\"herniated\"")
    );
    assert!(refused(db.record_review(id_of("L3/L4"), &review(Some("bulge"), true)).await).contains("at once"));
    assert!(refused(db.record_review(id_of("L2/L3"), &review(None, true)).await).contains("undetermined"));
    assert!(refused(db.record_review(id_of("L3/L4"), &review(None, false)).await).contains("give a class"));
    let mut anonymous = review(None, true);
    anonymous.reviewer = " ".into();
    assert!(refused(db.record_review(id_of("L3/L4"), &anonymous).await).contains("reviewer"));
    assert_eq!(db.reviews().await.unwrap().len(), 5, "nothing refused was written");
}

#[test]
fn reviews_on_sqlite() {
    runtime().block_on(on_sqlite(reviews));
}

#[test]
fn reviews_on_postgres() {
    let pg = Postgres::start();
    runtime().block_on(reviews(pg.fresh_database("reviews")));
}

/// One bad value must not stop the finding log: a NUL byte in a calling AE title and in a
/// PatientID (PostgreSQL refuses NUL in text) is written as U+FFFD, and every record after it is
/// written too, with nothing left pending or journalled.
async fn a_nul_byte_does_not_stop_the_log(url: String) {
    let db = Db::connect(&url).await.unwrap();
    db.migrate().await.unwrap();
    let state = tempfile::tempdir().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let writer = tokio::spawn(Writer::new(db.clone(), state.path(), "test-host").run(rx));
    let mut evil = association("evil");
    evil.calling_ae = "EVIL\0AE".into();
    tx.send(Record::Association(evil)).unwrap();
    tx.send(Record::Series(series_row("1.7.1", "P\x007", "7.7", "2026-03-03", "complete", 1))).unwrap();
    tx.send(Record::Association(association("after"))).unwrap();
    drop(tx);
    writer.await.unwrap();
    assert_eq!(db.count(Table::Associations).await.unwrap(), 2);
    assert_eq!(db.count(Table::Series).await.unwrap(), 1);
    assert_eq!(db.count(Table::Jobs).await.unwrap(), 1);
    let series = db.series_identity("1.7.1").await.unwrap().unwrap();
    assert_eq!(series.patient_id.as_deref(), Some("P\u{FFFD}7"));
    assert!(!state.path().join("db-pending-test-host.jsonl").exists());
}

#[test]
fn a_nul_byte_does_not_stop_the_log_on_sqlite() {
    runtime().block_on(on_sqlite(a_nul_byte_does_not_stop_the_log));
}

#[test]
fn a_nul_byte_does_not_stop_the_log_on_postgres() {
    let pg = Postgres::start();
    runtime().block_on(a_nul_byte_does_not_stop_the_log(pg.fresh_database("nul")));
}

/// The finding log over TLS: with `sslmode=verify-full` the server's certificate must chain to
/// `sslrootcert` and name the host; a server that takes TLS only refuses a plain connection, and
/// a certificate from another CA is refused by the agent.
#[test]
fn the_finding_log_over_tls_checks_the_server() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = common::pki::TestPki::make(&tmp.path().join("pki"));
    let pg = Postgres::start();
    pg.require_tls(&pki.path("a.pem"), &pki.path("a.key"));
    let url = pg.fresh_database("tls");
    runtime().block_on(async {
        let verified = format!("{url}?sslmode=verify-full&sslrootcert={}", pki.path("ca.pem"));
        let db = Db::connect(&verified).await.unwrap();
        db.migrate().await.unwrap();
        db.record_association(&association("over-tls")).await.unwrap();
        assert_eq!(db.count(Table::Associations).await.unwrap(), 1);
        let plain = Db::connect(&format!("{url}?sslmode=disable")).await;
        assert!(plain.is_err(), "a plain connection was let in");
        let other_ca =
            Db::connect(&format!("{url}?sslmode=verify-full&sslrootcert={}", pki.path("stranger.pem"))).await;
        let error = other_ca.err().expect("a server certificate from another CA was trusted").to_string();
        assert!(error.to_lowercase().contains("certificate"), "{error}");
    });
}

/// The audit trail's rows: written once however often a record is replayed, read back in order.
async fn audit_trail_rows(url: String) {
    let db = Db::connect(&url).await.unwrap();
    db.migrate().await.unwrap();
    let row = |n: u32, event: &str| idaics::store::db::AuditRow {
        event_key: format!("host:1:2/{n}"),
        at: format!("2026-12-03T06:00:0{n}Z"),
        agent: "host:1:2".into(),
        event: event.into(),
        peer: Some("10.0.0.9:40000".into()),
        calling_ae: Some("PACS".into()),
        called_ae: Some("IDAICS".into()),
        detail: Some("over TLS".into()),
    };
    for record in [row(1, "association-accepted"), row(2, "instances-stored"), row(1, "association-accepted")] {
        db.record_audit(&record).await.unwrap();
    }
    assert_eq!(db.count(Table::AuditEvents).await.unwrap(), 2);
    let trail = db.audit_events("2026-12-03T06:00:02Z").await.unwrap();
    assert_eq!(trail, [row(2, "instances-stored")]);
}

#[test]
fn audit_trail_on_sqlite() {
    runtime().block_on(on_sqlite(audit_trail_rows));
}

#[test]
fn audit_trail_on_postgres() {
    let pg = Postgres::start();
    runtime().block_on(audit_trail_rows(pg.fresh_database("audit_trail")));
}

/// The HTTP API's pool reads and cannot write.
async fn the_readers_pool_reads_only(url: String) {
    let db = Db::connect(&url).await.unwrap();
    db.migrate().await.unwrap();
    db.record_association(&association("written")).await.unwrap();
    let reader = Db::open_reader(&url).unwrap();
    assert_eq!(reader.count(Table::Associations).await.unwrap(), 1);
    assert!(reader.record_association(&association("through the reader")).await.is_err());
    assert_eq!(db.count(Table::Associations).await.unwrap(), 1);
}

#[test]
fn the_readers_pool_reads_only_on_sqlite() {
    runtime().block_on(on_sqlite(the_readers_pool_reads_only));
}

#[test]
fn the_readers_pool_reads_only_on_postgres() {
    let pg = Postgres::start();
    runtime().block_on(the_readers_pool_reads_only(pg.fresh_database("reader")));
}
