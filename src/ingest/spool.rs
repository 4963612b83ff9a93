//! The on-disk spool: the truth for what was received.
//!
//! An instance is streamed into `<state>/tmp/` while it arrives, made durable (fdatasync) and
//! checked, and only once both are done renamed into `<state>/spool/<study>/<series>/<sop>.dcm`
//! and its directory synced. Only after that may the SCP answer Success, so an acknowledged
//! instance survives a crash or a power cut. Path components come from UIDs that passed
//! [`check_uid`], never from raw input.
//!
//! The sender waits for each answer, so the time from the last fragment to the answer is the
//! agent's whole cost per instance. Disk writing starts while fragments arrive, the check runs
//! while the disk finishes, and the temporary file was created before the instance arrived.

use crate::common::IMPLEMENTATION_VERSION_NAME;
use crate::common::{IMPLEMENTATION_CLASS_UID, trim_uid};
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_object::meta::FileMetaTableBuilder;
use dicom_object::{DefaultDicomObject, OpenFileOptions};
use serde::{Deserialize, Serialize};

use crate::ingest::pixel_module::PixelModule;

/// Instances with encapsulated pixel data up to this size are parsed whole before they are
/// accepted, to check their fragments and first frame; larger ones (big Enhanced CT objects) are
/// checked up to the pixel data only, to keep memory bounded.
const FULL_PARSE_LIMIT: u64 = 64 * 1024 * 1024;

/// Deepest sequence nesting accepted. CT objects nest a few levels (Enhanced CT's functional
/// groups three or four). The parser recurses once per level, so a data set of some thousands of
/// nested sequences, a few hundred kilobytes long, would overflow its stack and abort the agent.
const MAX_SEQUENCE_DEPTH: usize = 64;

/// Most data elements (sequence items included) accepted in one instance. A real CT holds a few
/// hundred; an Enhanced CT of thousands of frames some hundred thousand. In memory each costs
/// the parser about ten times its few bytes on the wire, so a flood of tiny elements would turn
/// an instance of a few hundred megabytes into gigabytes.
const MAX_ELEMENTS: usize = 1_000_000;

/// Name of the per-series state file written when a series is completed or skipped.
pub const SERIES_STATE_FILE: &str = "series.json";

/// The PatientID a series' instances in the spool belong to (see `Spool::claim_for_patient`).
const PATIENT_MARKER: &str = ".patient-id";

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("I/O error on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("instance is larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("the deflated data set inflates to more than the limit of {limit} bytes")]
    InflatesTooLarge { limit: u64 },
    #[error("{tag} ({vr:?}) holds {len} bytes, more than the {limit} bytes accepted for a value other than pixel data")]
    ValueTooLarge { tag: Tag, vr: dicom_core::VR, len: u32, limit: u32 },
    #[error("not a readable DICOM data set: {0}")]
    Unparsable(String),
    #[error("invalid {attribute}: {reason}")]
    InvalidAttribute { attribute: &'static str, reason: String },
    #[error("pixel data cannot be decoded: {0}")]
    UndecodablePixelData(String),
    #[error("pixel data description does not hold: {0}")]
    PixelDescription(String),
    #[error(
        "PatientID differs from that of the instances of series {series} already received: \
         one series cannot hold two patients"
    )]
    OtherPatient { series: String },
    #[error(
        "StudyInstanceUID differs from that of the instances of series {series} already received: \
         a series UID names one series of one study"
    )]
    OtherStudy { series: String },
    #[error("{attribute} in the data set ({in_dataset}) differs from the C-STORE request ({in_command})")]
    Mismatch { attribute: &'static str, in_dataset: String, in_command: String },
}

impl SpoolError {
    /// True when the failure is ours (disk, permissions), not the sender's data.
    pub fn is_local_resource_problem(&self) -> bool {
        matches!(self, SpoolError::Io { .. } | SpoolError::TooLarge { .. } | SpoolError::InflatesTooLarge { .. })
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io { path: path.to_path_buf(), source }
}

/// Checks a UID against PS3.5 section 9.1: 1 to 64 characters, digits and dots, components not
/// empty and without leading zeros. Trailing NUL or space padding must already be stripped.
pub fn check_uid(uid: &str) -> Result<(), String> {
    if uid.is_empty() {
        return Err("empty".into());
    }
    if uid.len() > 64 {
        return Err(format!("{} characters long, at most 64", uid.len()));
    }
    for component in uid.split('.') {
        if component.is_empty() {
            return Err(format!("{uid:?} has an empty component"));
        }
        if !component.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("{uid:?} has characters other than digits and dots"));
        }
        if component.len() > 1 && component.starts_with('0') {
            return Err(format!("{uid:?} has a component with a leading zero"));
        }
    }
    Ok(())
}

/// Identifiers the C-STORE request announced, which the data set must repeat.
#[derive(Debug, Clone)]
pub struct StoreRequest {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub transfer_syntax_uid: String,
    pub calling_ae_title: String,
}

/// What the rest of the agent needs to know about an instance, read from its header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceHeader {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub transfer_syntax_uid: String,
    pub modality: Option<String>,
    /// To know the agent's own objects when they are sent back to it.
    #[serde(default)]
    pub manufacturer: Option<String>,
    pub image_type: Vec<String>,
    /// For the site's series selection rules (`series.include_descriptions`, ...).
    #[serde(default)]
    pub series_description: Option<String>,
    pub instance_number: Option<i32>,
    pub image_position: Option<[f64; 3]>,
    pub image_orientation: Option<[f64; 6]>,
    pub number_of_frames: u32,
    pub images_in_acquisition: Option<u32>,
    /// Lossy Image Compression (0028,2110) is 01: the pixels were lossy compressed at some point,
    /// perhaps before this (lossless) copy was made.
    #[serde(default)]
    pub lossy_image_compression: bool,
    /// Patient ID (0010,0020), trimmed; empty when absent.
    #[serde(default)]
    pub patient_id: String,
}

impl InstanceHeader {
    /// Extracts and validates the header fields; the UIDs must be present and valid.
    pub fn from_object(obj: &DefaultDicomObject) -> Result<InstanceHeader, SpoolError> {
        let uid = |tag: Tag, attribute: &'static str| -> Result<String, SpoolError> {
            let value = obj
                .element_opt(tag)
                .ok()
                .flatten()
                .and_then(|e| e.to_str().ok())
                .map(|s| trim_uid(&s).to_string())
                .ok_or_else(|| SpoolError::InvalidAttribute { attribute, reason: "missing".into() })?;
            check_uid(&value).map_err(|reason| SpoolError::InvalidAttribute { attribute, reason })?;
            Ok(value)
        };
        let text = |tag: Tag| -> Option<String> {
            obj.element_opt(tag)
                .ok()
                .flatten()
                .and_then(|e| e.to_str().ok())
                .map(|s| s.trim_matches([' ', '\0']).to_string())
                .filter(|s| !s.is_empty())
        };
        let floats = |tag: Tag| -> Option<Vec<f64>> {
            obj.element_opt(tag)
                .ok()
                .flatten()
                .and_then(|e| e.to_multi_float64().ok())
                .filter(|v| v.iter().all(|x| x.is_finite()))
        };
        let int =
            |tag: Tag| -> Option<i64> { obj.element_opt(tag).ok().flatten().and_then(|e| e.to_int::<i64>().ok()) };
        // Enhanced CT keeps its orientation in functional groups: the shared ones, or else the
        // first frame's. The volume stage reads every frame's; this one tells the stack's kind.
        let functional_group_orientation = || {
            [tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE, tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE].into_iter().find_map(
                |sequence| {
                    let group = obj.element_opt(sequence).ok().flatten()?.items()?.first()?;
                    let plane = group.element_opt(tags::PLANE_ORIENTATION_SEQUENCE).ok().flatten()?.items()?.first()?;
                    plane.element_opt(tags::IMAGE_ORIENTATION_PATIENT).ok().flatten()?.to_multi_float64().ok()
                },
            )
        };
        Ok(InstanceHeader {
            sop_class_uid: uid(tags::SOP_CLASS_UID, "SOPClassUID")?,
            sop_instance_uid: uid(tags::SOP_INSTANCE_UID, "SOPInstanceUID")?,
            study_instance_uid: uid(tags::STUDY_INSTANCE_UID, "StudyInstanceUID")?,
            series_instance_uid: uid(tags::SERIES_INSTANCE_UID, "SeriesInstanceUID")?,
            transfer_syntax_uid: trim_uid(obj.meta().transfer_syntax()).to_string(),
            modality: text(tags::MODALITY),
            manufacturer: text(tags::MANUFACTURER),
            image_type: text(tags::IMAGE_TYPE)
                .map(|s| s.split('\\').map(|p| p.trim().to_string()).collect())
                .unwrap_or_default(),
            patient_id: text(tags::PATIENT_ID).unwrap_or_default(),
            series_description: text(tags::SERIES_DESCRIPTION),
            instance_number: int(tags::INSTANCE_NUMBER).and_then(|v| i32::try_from(v).ok()),
            image_position: floats(tags::IMAGE_POSITION_PATIENT).and_then(|v| <[f64; 3]>::try_from(v.as_slice()).ok()),
            image_orientation: floats(tags::IMAGE_ORIENTATION_PATIENT)
                .or_else(functional_group_orientation)
                .filter(|v| v.iter().all(|x| x.is_finite()))
                .and_then(|v| <[f64; 6]>::try_from(v.as_slice()).ok()),
            number_of_frames: int(tags::NUMBER_OF_FRAMES)
                .and_then(|v| u32::try_from(v).ok())
                .filter(|v| *v > 0)
                .unwrap_or(1),
            images_in_acquisition: int(tags::IMAGES_IN_ACQUISITION)
                .and_then(|v| u32::try_from(v).ok())
                .filter(|v| *v > 0),
            lossy_image_compression: text(tags::LOSSY_IMAGE_COMPRESSION).as_deref() == Some("01"),
        })
    }

    /// Reads the header of a spooled file (pixel data not loaded).
    pub fn read(path: &Path) -> Result<InstanceHeader, SpoolError> {
        let obj = OpenFileOptions::new()
            .read_until(tags::PIXEL_DATA)
            .open_file(path)
            .map_err(|e| SpoolError::Unparsable(e.to_string()))?;
        Self::from_object(&obj)
    }
}

/// The state of a series as recorded in its `series.json` once the tracker decided on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeriesRecord {
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    /// "complete" or "skipped".
    pub state: String,
    pub skip_reason: Option<String>,
    /// What ended the wait: "association-released", "quiet-period", "max-wait".
    pub trigger: String,
    pub instances: usize,
    pub slices: usize,
    /// Counts completions of this series: a series reopened by later instances is decided again.
    pub revision: u32,
    pub decided_at: String,
    /// When retention removed the instances (`storage.retention_days`); the record stays, so a
    /// series sent again is decided as its next revision and analysed again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purged_at: Option<String>,
}

/// A series directory found in the spool.
#[derive(Debug)]
pub struct SpooledSeries {
    pub dir: PathBuf,
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub record: Option<SeriesRecord>,
    /// How many instance files it holds; [`instance_files`] lists them. Only counted here: a
    /// spool of a million instances listed at once would hold the agent's memory at its peak.
    pub instances: usize,
}

/// A file being received into the temporary directory.
pub struct PartialInstance {
    file: File,
    path: PathBuf,
    written: u64,
    limit: u64,
    request: StoreRequest,
    /// Where the received bytes begin to be written back to disk (see `start_writeback`).
    writeback: Option<Writeback>,
}

/// The part of a file not yet handed to the disk, for instances that will be synced.
struct Writeback {
    /// File offset of the first byte not yet handed over.
    from: u64,
    /// File offset of the end of what was written.
    to: u64,
}

/// Received bytes are handed to the disk once this many have gathered: large enough that the
/// disk gets sizeable writes, small enough that most of an instance is on its way to the disk
/// before its last fragment arrives.
const WRITEBACK_CHUNK: u64 = 256 * 1024;

/// Spare temporary files kept ready: one per association that sends at the same time, for the
/// usual few.
const SPARE_FILES: usize = 4;

/// Hands out new temporary files, created ahead of need by a thread of their own. Creating a file
/// is a directory update that can cost as much as writing a whole slice, and a sender waits for
/// each acknowledgement: made in advance, it falls in the time the sender takes to prepare its
/// next instance instead.
struct TemporaryFiles {
    made: std::sync::Arc<SpareFiles>,
    /// One message per file taken; the maker thread ends when this is dropped.
    taken: std::sync::mpsc::Sender<()>,
}

struct SpareFiles {
    dir: PathBuf,
    counter: AtomicU64,
    ready: std::sync::Mutex<Vec<(File, PathBuf)>>,
}

impl SpareFiles {
    fn create(&self) -> Result<(File, PathBuf), SpoolError> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!("{}-{n}.part", std::process::id()));
        let file = File::create(&path).map_err(io_err(&path))?;
        Ok((file, path))
    }

    fn ready(&self) -> std::sync::MutexGuard<'_, Vec<(File, PathBuf)>> {
        self.ready.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl TemporaryFiles {
    fn new(dir: PathBuf) -> TemporaryFiles {
        let made = std::sync::Arc::new(SpareFiles { dir, counter: AtomicU64::new(0), ready: Default::default() });
        let (taken, requests) = std::sync::mpsc::channel::<()>();
        let maker = made.clone();
        let spawned = std::thread::Builder::new().name("idaics-tmpfiles".into()).spawn(move || {
            // Filled at once, then one new file per file taken.
            let mut wanted = SPARE_FILES;
            loop {
                while wanted > 0 && maker.ready().len() < SPARE_FILES {
                    match maker.create() {
                        Ok(spare) => maker.ready().push(spare),
                        // `take` creates its own file then, and reports the error to the sender.
                        Err(e) => tracing::debug!(error = %e, "cannot create a spare temporary file"),
                    }
                    wanted -= 1;
                }
                match requests.recv() {
                    Ok(()) => wanted = 1 + requests.try_iter().count(),
                    Err(_) => break,
                }
            }
            for (_, path) in maker.ready().drain(..) {
                let _ = fs::remove_file(path);
            }
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no thread to create temporary files ahead; each C-STORE creates its own");
        }
        TemporaryFiles { made, taken }
    }

    fn take(&self) -> Result<(File, PathBuf), SpoolError> {
        let spare = self.made.ready().pop();
        let _ = self.taken.send(());
        match spare {
            Some(spare) => Ok(spare),
            None => self.made.create(),
        }
    }
}

impl PartialInstance {
    /// Appends a fragment of the data set as it came off the wire.
    pub fn write_fragment(&mut self, data: &[u8]) -> Result<(), SpoolError> {
        self.written += data.len() as u64;
        if self.written > self.limit {
            return Err(SpoolError::TooLarge { limit: self.limit });
        }
        self.file.write_all(data).map_err(io_err(&self.path))?;
        if let Some(writeback) = &mut self.writeback {
            writeback.to += data.len() as u64;
            if writeback.to - writeback.from >= WRITEBACK_CHUNK {
                start_writeback(&self.file, writeback.from, writeback.to);
                writeback.from = writeback.to;
            }
        }
        Ok(())
    }

    pub fn request(&self) -> &StoreRequest {
        &self.request
    }
}

impl Drop for PartialInstance {
    fn drop(&mut self) {
        // Committed files were renamed away; anything still here was never acknowledged.
        let _ = fs::remove_file(&self.path);
    }
}

/// An instance that is durable in the spool.
#[derive(Debug, Clone)]
pub struct StoredInstance {
    pub path: PathBuf,
    pub header: InstanceHeader,
    pub bytes: u64,
}

/// How the spool treats incoming instances.
#[derive(Debug, Clone, Copy)]
pub struct SpoolPolicy {
    /// Sync data and directories before an instance counts as stored.
    pub fsync: bool,
    pub max_instance_bytes: u64,
    /// What one instance may cost beyond its size on the wire (see [`StructureLimits`]).
    pub structure: StructureLimits,
    /// Decode the first frame of compressed pixel data before accepting an instance.
    pub verify_compressed_pixel_data: bool,
}

pub struct Spool {
    spool_dir: PathBuf,
    fsync: bool,
    max_instance_bytes: u64,
    structure: StructureLimits,
    verify_compressed: bool,
    temporaries: TemporaryFiles,
    /// Held while an instance is renamed into the spool and while retention removes one: an
    /// instance sent again just as its old copy is removed must not be removed in its place.
    placing: std::sync::Mutex<()>,
    /// The study each series UID in the spool was first received in. Everything after the spool
    /// (decisions, jobs, outputs, the finding log) knows a series by its UID alone, which DICOM
    /// makes unique; an instance that files a known series UID under another study (a UID
    /// generator gone wrong, a hostile sender) is refused rather than analysed as part of it.
    /// Entries stay after retention, as the series' decision record does.
    series_studies: std::sync::Mutex<HashMap<String, String>>,
}

impl Spool {
    /// Creates the directories and removes temporary files a previous run left behind: they
    /// were never acknowledged, so the sender still has them.
    pub fn open(spool_dir: PathBuf, tmp_dir: PathBuf, policy: SpoolPolicy) -> Result<Spool, SpoolError> {
        fs::create_dir_all(&spool_dir).map_err(io_err(&spool_dir))?;
        fs::create_dir_all(&tmp_dir).map_err(io_err(&tmp_dir))?;
        let mut removed = 0;
        for entry in fs::read_dir(&tmp_dir).map_err(io_err(&tmp_dir))?.flatten() {
            // Empty ones are spares (see `TemporaryFiles`), not instances.
            let partial = entry.metadata().is_ok_and(|m| m.len() > 0);
            if fs::remove_file(entry.path()).is_ok() && partial {
                removed += 1;
            }
        }
        if removed > 0 {
            tracing::info!(removed, "removed unacknowledged partial files from a previous run");
        }
        let series_studies = series_studies(&spool_dir)?;
        Ok(Spool {
            spool_dir,
            fsync: policy.fsync,
            max_instance_bytes: policy.max_instance_bytes,
            structure: policy.structure,
            verify_compressed: policy.verify_compressed_pixel_data,
            temporaries: TemporaryFiles::new(tmp_dir),
            placing: std::sync::Mutex::new(()),
            series_studies: std::sync::Mutex::new(series_studies),
        })
    }

    pub fn spool_dir(&self) -> &Path {
        &self.spool_dir
    }

    pub fn series_dir(&self, study_uid: &str, series_uid: &str) -> PathBuf {
        self.spool_dir.join(study_uid).join(series_uid)
    }

    /// Opens a temporary file and writes the preamble and file meta group for an instance whose
    /// data set will follow in fragments.
    pub fn begin(&self, request: StoreRequest) -> Result<PartialInstance, SpoolError> {
        let (mut file, path) = self.temporaries.take()?;
        let meta = FileMetaTableBuilder::new()
            .media_storage_sop_class_uid(request.sop_class_uid.as_str())
            .media_storage_sop_instance_uid(request.sop_instance_uid.as_str())
            .transfer_syntax(request.transfer_syntax_uid.as_str())
            .implementation_class_uid(IMPLEMENTATION_CLASS_UID)
            .implementation_version_name(IMPLEMENTATION_VERSION_NAME)
            .source_application_entity_title(request.calling_ae_title.as_str())
            .build()
            .map_err(|e| SpoolError::InvalidAttribute { attribute: "file meta", reason: e.to_string() })?;
        let mut head = Vec::with_capacity(512);
        head.extend_from_slice(&[0u8; 128]);
        head.extend_from_slice(b"DICM");
        meta.write(&mut head)
            .map_err(|e| SpoolError::InvalidAttribute { attribute: "file meta", reason: e.to_string() })?;
        file.write_all(&head).map_err(io_err(&path))?;
        let writeback = self.fsync.then_some(Writeback { from: 0, to: head.len() as u64 });
        Ok(PartialInstance { file, path, written: 0, limit: self.max_instance_bytes, request, writeback })
    }

    /// Makes a received instance durable and moves it into the spool. Blocking: call it from a
    /// blocking context. On error the temporary file is removed and nothing enters the spool.
    pub fn commit(&self, partial: PartialInstance) -> Result<StoredInstance, SpoolError> {
        // The sender waits for our answer, so the data sync (mostly waiting on the disk) and the
        // validation (mostly CPU) run side by side instead of one after the other.
        let (synced, header) = std::thread::scope(|scope| {
            let sync = self.fsync.then(|| scope.spawn(|| partial.file.sync_data()));
            let header = self.validate(&partial);
            let synced = match sync {
                Some(handle) => handle.join().unwrap_or_else(|_| Err(io::Error::other("the data sync panicked"))),
                None => Ok(()),
            };
            (synced, header)
        });
        synced.map_err(io_err(&partial.path))?;
        let (header, bytes) = header?;
        let series_dir = self.series_dir(&header.study_instance_uid, &header.series_instance_uid);
        self.create_dirs_durably(&series_dir)?;
        let final_path = series_dir.join(format!("{}.dcm", header.sop_instance_uid));
        {
            let _placing = self.placing.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            self.check_study(&header)?;
            self.claim_for_patient(&series_dir, &header)?;
            fs::rename(&partial.path, &final_path).map_err(io_err(&final_path))?;
            self.series_studies
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .entry(header.series_instance_uid.clone())
                .or_insert_with(|| header.study_instance_uid.clone());
        }
        if self.fsync {
            sync_dir(&series_dir)?;
        }
        Ok(StoredInstance { path: final_path, header, bytes })
    }

    /// Checks a received instance before it is acknowledged: it parses, its pixel description
    /// adds up, and it is the instance its command announced. Returns its header and size.
    fn validate(&self, partial: &PartialInstance) -> Result<(InstanceHeader, u64), SpoolError> {
        let bytes = partial.file.metadata().map(|m| m.len()).map_err(io_err(&partial.path))?;
        let outline = check_structure(&partial.path, self.structure)?;
        // Native pixel data is checked by its length, which the structure check has read: the
        // header up to it is all that needs parsing. Encapsulated pixel data is parsed whole
        // (up to a size), to count its fragments and look into its first frame.
        let encapsulated = is_encapsulated(&partial.request.transfer_syntax_uid);
        let whole = encapsulated && bytes <= FULL_PARSE_LIMIT;
        let mut options = OpenFileOptions::new();
        if !whole {
            options = options.read_until(tags::PIXEL_DATA);
        }
        let obj = options.open_file(&partial.path).map_err(|e| SpoolError::Unparsable(e.to_string()))?;
        let header = InstanceHeader::from_object(&obj)?;
        let pixels = PixelModule::from_object(&obj).map_err(SpoolError::PixelDescription)?;
        if !encapsulated {
            match outline.native_pixel_data_bytes {
                None => return Err(SpoolError::PixelDescription("no PixelData".into())),
                Some(held) if held < pixels.total_bytes() => {
                    return Err(SpoolError::PixelDescription(pixels.shortfall(held)));
                }
                Some(held) if let Some(excess) = pixels.excess(held) => {
                    return Err(SpoolError::PixelDescription(excess));
                }
                Some(_) => {}
            }
        }
        if whole {
            pixels.check_against(&obj).map_err(SpoolError::PixelDescription)?;
            pixels.check_codestream(&obj, &header.transfer_syntax_uid).map_err(SpoolError::PixelDescription)?;
        }
        if self.verify_compressed && whole {
            // A compressed stream can parse as DICOM and still be undecodable (corrupt codestream,
            // parameters that contradict the header): refuse it now, while the sender can act.
            // The decoders are third-party code fed with the sender's bytes: a panic in one is
            // the data's fault as much as ours, and is answered as undecodable. JPEG Extended
            // goes to our own decoder (dicom-pixeldata's cannot read 12-bit DCT), under the same
            // guard.
            let first_frame_bytes = || -> Result<u64, String> {
                use dicom_pixeldata::PixelDecoder;
                if header.transfer_syntax_uid == crate::ingest::jpeg_extended::JPEG_EXTENDED {
                    let frame = crate::ingest::jpeg_extended::EncapsulatedFrames::of(&obj)?.decode(0)?;
                    Ok(frame.samples.len() as u64 * u64::from(pixels.bits_allocated.div_ceil(8)))
                } else {
                    let frame = obj.decode_pixel_data_frame(0).map_err(|e| e.to_string())?;
                    Ok(frame.data().len() as u64)
                }
            };
            let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(first_frame_bytes))
                .map_err(|_| SpoolError::UndecodablePixelData("the decoder failed on this stream".into()))?
                .map_err(SpoolError::UndecodablePixelData)?;
            if decoded < pixels.frame_bytes() {
                return Err(SpoolError::UndecodablePixelData(format!(
                    "the first frame decodes to {decoded} bytes; {} x {} pixels, {} sample(s) of {} bits need {}",
                    pixels.columns,
                    pixels.rows,
                    pixels.samples_per_pixel,
                    pixels.bits_allocated,
                    pixels.frame_bytes()
                )));
            }
        }
        drop(obj);
        let request = &partial.request;
        for (attribute, in_dataset, in_command) in [
            ("SOPClassUID", &header.sop_class_uid, &request.sop_class_uid),
            ("SOPInstanceUID", &header.sop_instance_uid, &request.sop_instance_uid),
        ] {
            if in_dataset != in_command {
                return Err(SpoolError::Mismatch {
                    attribute,
                    in_dataset: in_dataset.clone(),
                    in_command: in_command.clone(),
                });
            }
        }
        Ok((header, bytes))
    }

    /// A series UID belongs to the study of its first instance placed in the spool (see
    /// `series_studies`, which `commit` fills once the instance is in place). Call with `placing`
    /// held.
    fn check_study(&self, header: &InstanceHeader) -> Result<(), SpoolError> {
        let studies = self.series_studies.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match studies.get(&header.series_instance_uid) {
            Some(study) if *study != header.study_instance_uid => {
                Err(SpoolError::OtherStudy { series: header.series_instance_uid.clone() })
            }
            _ => Ok(()),
        }
    }

    /// A series belongs to the patient of its first instance (kept in the series folder) for as
    /// long as any of its instances is in the spool: one with another PatientID is refused, since
    /// its slices would be analysed, and reported, as the first patient's. Call with `placing`
    /// held, so two first instances cannot both set it.
    fn claim_for_patient(&self, series_dir: &Path, header: &InstanceHeader) -> Result<(), SpoolError> {
        let marker = series_dir.join(PATIENT_MARKER);
        match fs::read(&marker) {
            Ok(owner) if owner == header.patient_id.as_bytes() => Ok(()),
            Ok(_) if instance_files(series_dir)?.is_empty() => self.write_patient_marker(&marker, header),
            Ok(_) => Err(SpoolError::OtherPatient { series: header.series_instance_uid.clone() }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => match instance_files(series_dir)?.first() {
                // A series received before the marker existed: its first instance says.
                Some(first) => {
                    let owner = InstanceHeader::read(first).map(|h| h.patient_id).unwrap_or_default();
                    if owner != header.patient_id {
                        return Err(SpoolError::OtherPatient { series: header.series_instance_uid.clone() });
                    }
                    self.write_patient_marker(&marker, header)
                }
                None => self.write_patient_marker(&marker, header),
            },
            Err(e) => Err(io_err(&marker)(e)),
        }
    }

    fn write_patient_marker(&self, marker: &Path, header: &InstanceHeader) -> Result<(), SpoolError> {
        let mut file = File::create(marker).map_err(io_err(marker))?;
        file.write_all(header.patient_id.as_bytes()).map_err(io_err(marker))?;
        if self.fsync {
            file.sync_data().map_err(io_err(marker))?;
        }
        Ok(())
    }

    fn create_dirs_durably(&self, dir: &Path) -> Result<(), SpoolError> {
        create_dirs_durably(dir, self.fsync)
    }

    /// Writes a series' decision atomically (temporary file, sync, rename, directory sync).
    pub fn write_series_record(&self, record: &SeriesRecord) -> Result<(), SpoolError> {
        let dir = self.series_dir(&record.study_instance_uid, &record.series_instance_uid);
        let tmp = dir.join(format!(".{SERIES_STATE_FILE}.tmp"));
        let json = serde_json::to_vec_pretty(record).expect("a record always serialises");
        let mut file = File::create(&tmp).map_err(io_err(&tmp))?;
        file.write_all(&json).map_err(io_err(&tmp))?;
        if self.fsync {
            file.sync_data().map_err(io_err(&tmp))?;
        }
        let path = dir.join(SERIES_STATE_FILE);
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        if self.fsync {
            sync_dir(&dir)?;
        }
        Ok(())
    }

    /// Retention: removes a decided series' instances (those whose SOP instance UID `is_known`
    /// says it decided on) placed in the spool before `placed_before` (their inode change time: a rename sets it), and marks its
    /// record purged. An instance stored again since is kept, and the tracker reopens the series
    /// with it when its event arrives. Returns the files removed.
    pub fn purge_series(
        &self,
        study_uid: &str,
        series_uid: &str,
        is_known: impl Fn(&str) -> bool,
        placed_before: std::time::SystemTime,
    ) -> Result<usize, SpoolError> {
        use std::os::unix::fs::MetadataExt;
        let cutoff = placed_before.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let placed = |m: &fs::Metadata| {
            std::time::Duration::new(m.ctime().max(0) as u64, m.ctime_nsec().clamp(0, 999_999_999) as u32)
        };
        let dir = self.series_dir(study_uid, series_uid);
        let Some(record) = read_series_record(&dir) else {
            let unreadable = io::Error::new(io::ErrorKind::NotFound, "no readable decision");
            return Err(io_err(&dir.join(SERIES_STATE_FILE))(unreadable));
        };
        let mut removed = 0;
        for path in instance_files(&dir)? {
            if !path.file_stem().and_then(|sop| sop.to_str()).is_some_and(&is_known) {
                continue;
            }
            let _placing = self.placing.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            match fs::metadata(&path) {
                Ok(m) if placed(&m) < cutoff => {
                    fs::remove_file(&path).map_err(io_err(&path))?;
                    removed += 1;
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&path)(e)),
            }
        }
        let purged = SeriesRecord { purged_at: Some(crate::common::now_rfc3339()), ..record };
        self.write_series_record(&purged)?;
        Ok(removed)
    }

    /// Lists every series directory with its record (if decided) and its instance files.
    pub fn scan(&self) -> Result<Vec<SpooledSeries>, SpoolError> {
        scan_spool(&self.spool_dir)
    }
}

/// Which study each series folder of the spool is filed under: folder names only, nothing read.
/// Should two studies hold one series UID (a spool from before the rule), the first in name
/// order keeps it.
fn series_studies(spool_dir: &Path) -> Result<HashMap<String, String>, SpoolError> {
    let mut studies = HashMap::new();
    for study in fs::read_dir(spool_dir).map_err(io_err(spool_dir))?.flatten() {
        let study_uid = study.file_name().to_string_lossy().into_owned();
        if check_uid(&study_uid).is_err() || !study.path().is_dir() {
            continue;
        }
        for series in fs::read_dir(study.path()).map_err(io_err(&study.path()))?.flatten() {
            let series_uid = series.file_name().to_string_lossy().into_owned();
            if check_uid(&series_uid).is_ok() && series.path().is_dir() {
                studies
                    .entry(series_uid)
                    .and_modify(|kept: &mut String| {
                        if study_uid < *kept {
                            kept.clone_from(&study_uid)
                        }
                    })
                    .or_insert_with(|| study_uid.clone());
            }
        }
    }
    Ok(studies)
}

/// The decision recorded in a series directory, if any.
fn read_series_record(series_dir: &Path) -> Option<SeriesRecord> {
    fs::read(series_dir.join(SERIES_STATE_FILE)).ok().and_then(|bytes| serde_json::from_slice(&bytes).ok())
}

/// Lists the series of a spool directory; usable without opening a [`Spool`] (the CLI does).
pub fn scan_spool(spool_dir: &Path) -> Result<Vec<SpooledSeries>, SpoolError> {
    let mut found = Vec::new();
    let studies = match fs::read_dir(spool_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(io_err(spool_dir)(e)),
    };
    for study in studies.flatten() {
        let study_uid = study.file_name().to_string_lossy().into_owned();
        if check_uid(&study_uid).is_err() || !study.path().is_dir() {
            continue;
        }
        for series in fs::read_dir(study.path()).map_err(io_err(&study.path()))?.flatten() {
            let series_uid = series.file_name().to_string_lossy().into_owned();
            let dir = series.path();
            if check_uid(&series_uid).is_err() || !dir.is_dir() {
                continue;
            }
            let record = read_series_record(&dir);
            let instances = fs::read_dir(&dir)
                .map_err(io_err(&dir))?
                .flatten()
                .filter(|e| Path::new(&e.file_name()).extension().is_some_and(|e| e == "dcm"))
                .count();
            found.push(SpooledSeries {
                dir,
                study_instance_uid: study_uid.clone(),
                series_instance_uid: series_uid,
                record,
                instances,
            });
        }
    }
    found.sort_by(|a, b| a.dir.cmp(&b.dir));
    Ok(found)
}

/// The instance files of a spooled series directory, sorted.
pub fn instance_files(dir: &Path) -> Result<Vec<PathBuf>, SpoolError> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io_err(dir))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "dcm"))
        .collect();
    files.sort();
    Ok(files)
}

fn is_encapsulated(transfer_syntax_uid: &str) -> bool {
    use dicom_encoding::TransferSyntaxIndex;
    dicom_transfer_syntax_registry::TransferSyntaxRegistry
        .get(transfer_syntax_uid)
        .is_some_and(|ts| ts.is_encapsulated_pixel_data())
}

/// Walks a DICOM file's element headers without building anything, before the parser sees it.
/// The parser recurses once per sequence level, allocates and zeroes each value at its declared
/// length before reading it, and inflates a deflated data set whole: a few kilobytes could make
/// it overflow its stack or ask for gigabytes. Refused here are nesting deeper than
/// [`MAX_SEQUENCE_DEPTH`], more than [`MAX_ELEMENTS`] elements, a value longer than what follows
/// it, a binary value whose length is not a whole number of values, and a deflated data set that
/// inflates beyond `max_bytes`.
pub fn check_structure(path: &Path, limits: StructureLimits) -> Result<DataSetOutline, SpoolError> {
    use dicom_encoding::TransferSyntaxIndex;
    use dicom_parser::StatefulDecode;
    use dicom_parser::dataset::LazyDataToken;
    use dicom_parser::dataset::lazy_read::LazyDataSetReader;
    use dicom_transfer_syntax_registry::entries::{DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN};
    use std::io::{BufReader, Read, Seek, SeekFrom};

    let unparsable = |e: &dyn std::fmt::Display| SpoolError::Unparsable(e.to_string());
    // The data set after the preamble and the file meta group, and its transfer syntax.
    let data_set = || -> Result<(BufReader<File>, u64, String), SpoolError> {
        let file = File::open(path).map_err(io_err(path))?;
        let file_len = file.metadata().map_err(io_err(path))?.len();
        let mut reader = BufReader::with_capacity(64 * 1024, file);
        reader.seek(SeekFrom::Start(128)).map_err(io_err(path))?;
        let meta = dicom_object::meta::FileMetaTable::from_reader(&mut reader).map_err(|e| unparsable(&e))?;
        let start = reader.stream_position().map_err(io_err(path))?;
        Ok((reader, file_len.saturating_sub(start), trim_uid(meta.transfer_syntax()).to_string()))
    };
    let (reader, len, transfer_syntax_uid) = data_set()?;
    let ts = dicom_transfer_syntax_registry::TransferSyntaxRegistry
        .get(&transfer_syntax_uid)
        .ok_or_else(|| unparsable(&format!("unknown transfer syntax {transfer_syntax_uid}")))?;
    let inflated_ts = EXPLICIT_VR_LITTLE_ENDIAN.erased();
    let (source, ts, total): (Box<dyn Read>, _, u64) = if ts.uid() == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN.uid() {
        // Inflated once to learn its size without holding it, then again to walk it.
        let max_bytes = limits.max_inflated_bytes;
        let inflate = |reader| flate2::read::DeflateDecoder::new(reader).take(max_bytes.saturating_add(1));
        let inflated = io::copy(&mut inflate(reader), &mut io::sink()).map_err(|e| unparsable(&e))?;
        if inflated > max_bytes {
            return Err(SpoolError::InflatesTooLarge { limit: max_bytes });
        }
        (Box::new(inflate(data_set()?.0)), &inflated_ts, inflated)
    } else {
        (Box::new(reader), ts, len)
    };
    let decoder =
        dicom_parser::DynStatefulDecoder::new_with(source, ts, Default::default(), 0).map_err(|e| unparsable(&e))?;
    let mut reader = LazyDataSetReader::new(decoder);
    // A sequence and its items are one level.
    let mut depth = 0usize;
    let mut elements = 0usize;
    let mut outline = DataSetOutline::default();
    while let Some(token) = reader.advance() {
        let token = token.map_err(|e| unparsable(&e))?;
        if matches!(
            token,
            LazyDataToken::ElementHeader(_)
                | LazyDataToken::SequenceStart { .. }
                | LazyDataToken::ItemStart { .. }
                | LazyDataToken::PixelSequenceStart
        ) {
            elements += 1;
            if elements > MAX_ELEMENTS {
                return Err(unparsable(&format!("more than {MAX_ELEMENTS} data elements")));
            }
        }
        let value = match &token {
            LazyDataToken::LazyValue { header, decoder } => {
                // The parser reads whole numbers of binary values and moves on by the declared
                // length, so a remainder leaves it reading the next element from the wrong
                // byte, where any length, gigabytes included, can appear.
                let size = binary_value_size(header.vr);
                if header.len.0 % size != 0 {
                    return Err(unparsable(&format!(
                        "{} {:?} value of {} bytes, not a multiple of {size}",
                        header.tag, header.vr, header.len.0
                    )));
                }
                Some((header.tag, header.len.0, decoder.position()))
            }
            LazyDataToken::LazyItemValue { len, decoder } => Some((ITEM, *len, decoder.position())),
            _ => None,
        };
        if let Some((tag, len, at)) = value {
            if at + u64::from(len) > total {
                return Err(unparsable(&format!(
                    "{tag} claims {len} bytes at byte {at} of a data set of {total} bytes"
                )));
            }
            // Every value but the image's own pixels is read into memory by every later parse:
            // its size is bounded here, before the sender hears Success. Fragments of
            // encapsulated pixel data arrive as item values, and only there.
            let pixels = depth == 0 && PIXEL_DATA_TAGS.contains(&tag) || tag == ITEM;
            if !pixels && len > limits.max_value_bytes {
                let vr = match &token {
                    LazyDataToken::LazyValue { header, .. } => header.vr,
                    _ => dicom_core::VR::UN,
                };
                return Err(SpoolError::ValueTooLarge { tag, vr, len, limit: limits.max_value_bytes });
            }
            token.skip().map_err(|e| unparsable(&e))?;
            if depth == 0 && tag == tags::PIXEL_DATA {
                outline.native_pixel_data_bytes = Some(u64::from(len));
            }
            if depth == 0 && at + u64::from(len) == total {
                // The last value ends the data set. Stopping here rather than reading on to the
                // end of the file matters: the parser reports the end as an error, and errors
                // capture a stack trace when RUST_BACKTRACE is set, once per received instance.
                break;
            }
            continue;
        }
        match token {
            LazyDataToken::SequenceStart { .. } | LazyDataToken::PixelSequenceStart => {
                depth += 1;
                if depth > MAX_SEQUENCE_DEPTH {
                    return Err(unparsable(&format!("sequences nested more than {MAX_SEQUENCE_DEPTH} deep")));
                }
            }
            LazyDataToken::SequenceEnd => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(outline)
}

/// The image's own pixels, in their three forms: the only values allowed past
/// [`StructureLimits::max_value_bytes`].
/// (FFFE,E000): an item; its value is read as one only for a fragment of encapsulated pixel data.
const ITEM: Tag = Tag(0xFFFE, 0xE000);

const PIXEL_DATA_TAGS: [Tag; 3] = [tags::PIXEL_DATA, tags::FLOAT_PIXEL_DATA, tags::DOUBLE_FLOAT_PIXEL_DATA];

/// What one received instance may make the agent hold or read, beyond its size on the wire: a
/// few megabytes of deflated data can inflate to gigabytes, and one oversized value (a private
/// blob, a string of a million values) is held whole by every parse that follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StructureLimits {
    /// Largest data set, inflated, of a Deflated Explicit VR Little Endian instance.
    pub max_inflated_bytes: u64,
    /// Largest value of any element but the pixel data.
    pub max_value_bytes: u32,
}

impl StructureLimits {
    /// The limits `[limits]` sets for instances received over the network.
    pub fn configured(limits: &crate::config::LimitsConfig) -> StructureLimits {
        StructureLimits { max_inflated_bytes: limits.max_inflated_bytes(), max_value_bytes: limits.max_value_bytes() }
    }

    /// For files an operator names on the command line: structure is still checked (nesting,
    /// element counts, lengths that run past the end), sizes are theirs to choose.
    pub const LOCAL_FILES: StructureLimits =
        StructureLimits { max_inflated_bytes: u64::MAX, max_value_bytes: u32::MAX };
}

/// What `check_structure` learnt of a data set on its way through.
#[derive(Debug, Default)]
pub struct DataSetOutline {
    /// Length of the top-level Pixel Data when it is native (not encapsulated).
    pub native_pixel_data_bytes: Option<u64>,
}

/// Bytes per value of a binary VR, as the parser reads it; 1 for text and byte VRs.
fn binary_value_size(vr: dicom_core::VR) -> u32 {
    use dicom_core::VR;
    match vr {
        VR::US | VR::SS | VR::OW => 2,
        VR::UL | VR::SL | VR::FL | VR::AT | VR::OF | VR::OL => 4,
        VR::FD | VR::OD | VR::SV | VR::UV | VR::OV => 8,
        _ => 1,
    }
}

/// Asks the kernel to start writing a range of a file to disk without waiting for it, so that
/// the sync before the acknowledgement finds most of the instance already written. Only a hint:
/// durability still comes from that sync, and where the call is missing or fails nothing is lost.
#[cfg(target_os = "linux")]
fn start_writeback(file: &File, from: u64, to: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is open for the lifetime of `file`; the call only reads its arguments.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), from as i64, (to - from) as i64, libc::SYNC_FILE_RANGE_WRITE);
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &File, _from: u64, _to: u64) {}

/// Creates missing directories down to `dir`; with `sync`, each parent is synced so a new
/// directory entry is as durable as the files that will be placed inside it.
pub fn create_dirs_durably(dir: &Path, sync: bool) -> Result<(), SpoolError> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut missing = Vec::new();
    let mut cursor = dir;
    while !cursor.is_dir() {
        missing.push(cursor.to_path_buf());
        match cursor.parent() {
            Some(parent) => cursor = parent,
            None => break,
        }
    }
    for d in missing.iter().rev() {
        match fs::create_dir(d) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err(d)(e)),
        }
        if sync && let Some(parent) = d.parent() {
            sync_dir(parent)?;
        }
    }
    Ok(())
}

/// Makes the entries of `dir` (a file renamed into it, say) durable.
pub fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

/// Free bytes available to unprivileged writers on the file system holding `path`.
pub fn free_disk_bytes(path: &Path) -> io::Result<u64> {
    let stat = rustix::fs::statvfs(path)?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_are_checked_as_the_standard_says() {
        assert!(check_uid("1.2.840.10008.5.1.4.1.1.2").is_ok());
        assert!(check_uid("1.2.0.3").is_ok());
        for bad in ["", "1..2", "1.02", "1.2.", "../etc", "1.2/3", "1.2.a", &"1.".repeat(40)] {
            assert!(check_uid(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn free_disk_is_reported() {
        assert!(free_disk_bytes(Path::new("/")).unwrap() > 0);
        assert!(free_disk_bytes(Path::new("/no/such/dir")).is_err());
    }
}
