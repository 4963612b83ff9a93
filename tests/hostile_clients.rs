//! Clients that try to keep others out: idle sockets from one host, one that stops reading its
//! responses, a flood from a host nobody listed. A listed PACS still gets in and stores; the
//! slow reader is cut off; rejections are all counted and logged at a bounded rate.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_ul::Pdu;
use dicom_ul::pdu::{AssociationRQ, PDataValue, PDataValueType, PresentationContextProposed, UserVariableItem};

const VERIFICATION: &str = "1.2.840.10008.1.1";
const IMPLICIT_LE: &str = "1.2.840.10008.1.2";

/// A TCP connection to the agent from a loopback address of our choosing (127.0.0.0/8 is all
/// ours), so that one test can play several hosts.
fn connect_from(source: &str, port: u16) -> TcpStream {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_io().build().unwrap();
    let stream = runtime.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
        socket.connect(SocketAddr::from(([127, 0, 0, 1], port))).await.unwrap()
    });
    let stream = stream.into_std().unwrap();
    stream.set_nonblocking(false).unwrap();
    stream
}

fn write_pdu(stream: &mut TcpStream, pdu: &Pdu) -> std::io::Result<()> {
    let mut bytes = Vec::new();
    dicom_ul::write_pdu(&mut bytes, pdu).unwrap();
    stream.write_all(&bytes)
}

/// An A-ASSOCIATE-RQ for verification from this calling AE title, whatever bytes it holds.
fn verification_request(calling_ae_title: &str) -> Pdu {
    Pdu::AssociationRQ(AssociationRQ {
        protocol_version: 1,
        calling_ae_title: calling_ae_title.into(),
        called_ae_title: AE.into(),
        application_context_name: "1.2.840.10008.3.1.1.1".into(),
        presentation_contexts: vec![PresentationContextProposed {
            id: 1,
            abstract_syntax: VERIFICATION.into(),
            transfer_syntaxes: vec![IMPLICIT_LE.into()],
        }],
        user_variables: vec![UserVariableItem::MaxLength(16384)],
    })
}

/// Opens a verification association on a connection made by hand; panics unless accepted.
fn associate(stream: &mut TcpStream) {
    write_pdu(stream, &verification_request("SLOWREADER")).unwrap();
    let mut header = [0u8; 6];
    stream.read_exact(&mut header).unwrap();
    assert_eq!(header[0], 0x02, "an A-ASSOCIATE-AC, not PDU type {:#04x}", header[0]);
    let length = u32::from_be_bytes(header[2..6].try_into().unwrap());
    let mut body = vec![0u8; length as usize];
    stream.read_exact(&mut body).unwrap();
}

/// One C-ECHO-RQ command set, Implicit VR Little Endian with its group length.
fn echo_command(message_id: u16) -> Vec<u8> {
    let command = dicom_object::InMemDicomObject::command_from_element_iter([
        DataElement::new(tags::AFFECTED_SOP_CLASS_UID, VR::UI, PrimitiveValue::from(VERIFICATION)),
        DataElement::new(tags::COMMAND_FIELD, VR::US, PrimitiveValue::from(0x0030u16)),
        DataElement::new(tags::MESSAGE_ID, VR::US, PrimitiveValue::from(message_id)),
        DataElement::new(tags::COMMAND_DATA_SET_TYPE, VR::US, PrimitiveValue::from(0x0101u16)),
    ]);
    let mut bytes = Vec::new();
    command
        .write_dataset_with_ts(&mut bytes, &dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN.erased())
        .unwrap();
    bytes
}

fn metric(port: u16, sample: &str) -> u64 {
    let (status, text) = http_get(port, "/metrics");
    assert_eq!(status, 200);
    text.lines()
        .find_map(|l| l.strip_prefix(sample).map(|v| v.trim().parse().unwrap()))
        .unwrap_or_else(|| panic!("no {sample} in\n{text}"))
}

#[test]
fn idle_sockets_and_a_slow_reader_do_not_keep_a_listed_pacs_out() {
    let tmp = tempfile::tempdir().unwrap();
    // The PACS is 127.0.0.1; 127.0.0.2 is a listed modality gone wrong.
    let agent = Agent::start(
        &tmp.path().join("state"),
        &[("IDAICS_DICOM_ALLOWED_PEERS", "127.0.0.1,127.0.0.2"), ("IDAICS_LIMITS_WRITE_TIMEOUT_S", "2")],
    );

    // One that associates, sends echo requests and never reads a response. Its writes fill the
    // agent's socket; the agent gives up on it after the write timeout.
    let mut slow = connect_from("127.0.0.2", agent.port);
    associate(&mut slow);
    slow.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
    // 16 sockets that open and say nothing: 7 more (up to limits.max_associations_per_peer, 8) wait
    // in negotiation, the rest are refused at once.
    let idle: Vec<TcpStream> = (0..16).map(|_| connect_from("127.0.0.2", agent.port)).collect();
    let flood = std::thread::spawn(move || {
        let mut sent = 0u32;
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            let pdu = Pdu::PData {
                data: vec![PDataValue {
                    presentation_context_id: 1,
                    value_type: PDataValueType::Command,
                    is_last: true,
                    data: echo_command((sent % 60000) as u16 + 1),
                }],
            };
            if write_pdu(&mut slow, &pdu).is_err() {
                // Our side is full too, or the agent closed it: either way it stopped taking.
                break;
            }
            sent += 1;
        }
        (sent, slow)
    });

    // The PACS echoes and stores while all that goes on.
    assert!(agent.echo(), "the listed PACS was kept out:\n{}", agent.log());
    let series = tmp.path().join("series");
    let spec = idaics::synthetic::SeriesSpec { slices: 5, ..Default::default() };
    let written = idaics::synthetic::write_ct_series(&series, &spec).unwrap().files;
    let out = agent.storescu(&[], &written);
    assert_eq!(store_outcomes(&out), (5, 0), "{}", output_text(&out));

    // The slow reader is cut off within the write timeout (and the idle ones by the association
    // timeout, later).
    wait_until("the slow reader cut off", Duration::from_secs(60), || agent.log().contains("cannot send response"));
    let (sent, _slow) = flood.join().unwrap();
    assert!(sent > 0);
    let refused = agent.events("too many associations from this peer; rejecting (transient)");
    assert!(!refused.is_empty(), "{}", agent.log());
    assert!(refused.iter().all(|e| e["span"]["peer"].as_str().unwrap().starts_with("127.0.0.2:")));
    drop(idle);
    assert_eq!(agent.spool_files().len(), 5, "every acknowledged instance is in the spool");
}

#[test]
fn a_flood_from_an_unlisted_host_is_counted_not_logged_line_by_line() {
    let tmp = tempfile::tempdir().unwrap();
    let http = free_port();
    let agent = Agent::start(
        &tmp.path().join("state"),
        &[("IDAICS_DICOM_ALLOWED_PEERS", "127.0.0.1"), ("IDAICS_HTTP_PORT", &http.to_string())],
    );
    // 200 connections from 127.0.0.3, each closed at once (a port scanner, a sender retrying).
    for _ in 0..200 {
        drop(connect_from("127.0.0.3", agent.port));
    }
    wait_until("200 rejections counted", Duration::from_secs(30), || {
        metric(http, "idaics_associations_total{outcome=\"rejected\"}") >= 200
    });
    // The first 30 of the minute are logged (the log may trail the counter by a moment), no more.
    let logged = || agent.events("peer address not in the allow-list; rejecting").len();
    wait_until("30 rejections logged", Duration::from_secs(10), || logged() >= 30);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(logged(), 30);
    assert!(metric(http, "idaics_rejections_unlogged_total") >= 170);
    // Nothing of it kept the listed host out.
    assert!(agent.echo(), "{}", agent.log());
}

/// A raw HTTP/1.1 request with the headers given; (status, body).
fn http_with(port: u16, path: &str, headers: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{headers}\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

/// Whether the server closed the connection (read returns end of file, or a reset) within the time.
fn closed_within(stream: &mut TcpStream, time: Duration) -> bool {
    stream.set_read_timeout(Some(time)).unwrap();
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return false;
            }
            Err(_) => return true,
        }
    }
}

#[test]
fn the_findings_api_asks_for_its_token_and_slow_or_surplus_http_clients_are_cut_off() {
    let tmp = tempfile::tempdir().unwrap();
    let http = free_port();
    let token = "s3cr3t-t0ken-of-the-site";
    let agent = Agent::start(
        &tmp.path().join("state"),
        &[
            ("IDAICS_HTTP_PORT", &http.to_string()),
            ("IDAICS_HTTP_API_TOKEN", token),
            ("IDAICS_HTTP_HEADER_TIMEOUT_S", "4"),
            ("IDAICS_HTTP_MAX_CONNECTIONS", "4"),
        ],
    );
    let (status, body) = http_with(http, "/api/v1/findings", "");
    assert_eq!(status, 401, "{body}");
    assert_eq!(http_with(http, "/api/v1/findings", "Authorization: Bearer wrong-token-of-same-len\r\n").0, 401);
    let (status, body) = http_with(http, "/api/v1/findings", &format!("Authorization: Bearer {token}\r\n"));
    assert_eq!(status, 200, "{body}");
    // Probes and metrics hold no patient data and stay open.
    assert_eq!(http_with(http, "/readyz", "").0, 200);
    assert_eq!(http_with(http, "/metrics", "").0, 200);

    // Five clients that send half a request and then nothing: four take every connection, one
    // is closed at once, and the four are closed once the header timeout passes. (The requests
    // above give their connections back a moment after their answers: wait that moment out.)
    std::thread::sleep(Duration::from_millis(500));
    let mut slow: Vec<TcpStream> = (0..5)
        .map(|_| {
            let mut stream = TcpStream::connect(("127.0.0.1", http)).unwrap();
            let _ = stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n");
            stream
        })
        .collect();
    let closed_at_once = slow.iter_mut().map(|s| closed_within(s, Duration::from_millis(300))).filter(|&c| c).count();
    assert_eq!(closed_at_once, 1, "connections beyond http.max_connections (4) are closed as they arrive");
    for stream in &mut slow {
        assert!(closed_within(stream, Duration::from_secs(10)), "a client that never finished its headers was kept");
    }
    assert_eq!(http_with(http, "/healthz", "").0, 200, "{}", agent.log());
}

/// A calling AE title with a NUL byte in it (PostgreSQL refuses NUL in text), on a running agent
/// whose finding log is PostgreSQL: the association is refused, its record (the NUL written as
/// U+FFFD) does not stop the log, which records the next sender's association and series, and
/// every acknowledged instance is in the spool.
#[test]
fn a_nul_in_a_calling_ae_title_does_not_stop_the_finding_log_on_postgres() {
    let pg = common::postgres::Postgres::start();
    let url = pg.fresh_database("hostile");
    let tmp = tempfile::tempdir().unwrap();
    let agent = Agent::start(&tmp.path().join("state"), &[("IDAICS_DATABASE_URL", &url)]);
    let mut stream = connect_from("127.0.0.4", agent.port);
    write_pdu(&mut stream, &verification_request("BAD\0AE")).unwrap();
    // Refused: an AE title holds no control characters.
    let mut answer = [0u8; 1];
    stream.read_exact(&mut answer).unwrap();
    assert_eq!(answer[0], 0x03, "an A-ASSOCIATE-RJ, not PDU type {:#04x}", answer[0]);
    drop(stream);
    // Then a sender that behaves: its series is stored, and logged.
    let spec = idaics::synthetic::SeriesSpec { slices: 4, size: 64, seed: 777, ..Default::default() };
    let series = idaics::synthetic::write_ct_series(&tmp.path().join("series"), &spec).unwrap();
    assert_eq!(store_outcomes(&agent.storescu(&[], &series.files)), (4, 0));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let db = runtime.block_on(idaics::store::db::Db::connect(&url)).unwrap();
    wait_until("the good association and its series in PostgreSQL", Duration::from_secs(30), || {
        runtime.block_on(async {
            db.count(idaics::store::db::Table::Associations).await.unwrap_or(0) >= 2
                && db.count(idaics::store::db::Table::Series).await.unwrap_or(0) == 1
        })
    });
    assert!(!agent.log().contains("database unreachable"), "{}", agent.log());
    assert_eq!(agent.spool_files().len(), 4);
}
