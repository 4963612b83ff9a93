//! Series completion: groups stored instances by series and decides when a series is complete,
//! or why it is skipped.
//!
//! DICOM has no "end of series" message, so completion is inferred: a quiet period with no new
//! instance, or the release of the association that carried the series when its slices already
//! form a contiguous stack (unless it came one association after another), bounded by a maximum
//! wait. Decisions are written to the series'
//! `series.json` in the spool, so a restarted agent neither repeats nor forgets them.

use crate::common::now_rfc3339;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use crate::config::SeriesConfig;
use crate::geometry::{cross, dot};
use crate::ingest::spool::{InstanceHeader, SeriesRecord, Spool, SpoolError};

/// Identifies one association for the tracker's bookkeeping.
pub type AssociationId = u64;

#[derive(Debug)]
pub enum TrackerEvent {
    /// An instance is durable in the spool. Boxed: the header is many times the size of the
    /// other events, and every event in the channel would pay for it.
    Stored { association: AssociationId, header: Box<InstanceHeader> },
    /// An association ended; `released` is false when it was aborted or broke.
    AssociationEnded { association: AssociationId, released: bool },
    /// Retention: the series' analysis is finished and delivered, and its retention period is
    /// over as of `asked_at`, when the database was asked; remove its instances (and `outputs`,
    /// the job's objects), keeping any placed in the spool since.
    /// Answers whether nothing of the series is left to remove.
    Purge {
        study_uid: String,
        series_uid: String,
        asked_at: std::time::SystemTime,
        outputs: PathBuf,
        done: tokio::sync::oneshot::Sender<bool>,
    },
}

/// A series the tracker decided on, handed to the pipeline.
#[derive(Debug, Clone)]
pub struct DecidedSeries {
    pub dir: PathBuf,
    pub record: SeriesRecord,
}

impl DecidedSeries {
    pub fn is_complete(&self) -> bool {
        self.record.state == "complete"
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    AssociationReleased,
    QuietPeriod,
    MaxWait,
}

impl PendingSeries {
    fn new(study_uid: String, instances: HashMap<String, InstanceHeader>, revision: u32, now: Instant) -> Self {
        PendingSeries {
            study_uid,
            instances,
            first_seen: now,
            last_seen: now,
            carried_by: HashMap::new(),
            revision,
            carrier_ended: false,
            sent_in_turns: false,
        }
    }
}

fn log_sent_in_turns(series_uid: &str) {
    tracing::info!(
        series_uid,
        decided_by = "quiet period, not release",
        "series arrives one association after another"
    );
}

/// Headers of spooled files by SOP instance UID; unreadable files are logged and left out.
fn read_headers<'a>(files: impl IntoIterator<Item = &'a std::path::Path>) -> HashMap<String, InstanceHeader> {
    let mut instances = HashMap::new();
    for file in files {
        match InstanceHeader::read(file) {
            Ok(h) => {
                instances.insert(h.sop_instance_uid.clone(), h);
            }
            Err(e) => {
                tracing::warn!(path = %file.display(), error = %e, "spooled file unreadable; left out of its series")
            }
        }
    }
    instances
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::AssociationReleased => "association-released",
            Trigger::QuietPeriod => "quiet-period",
            Trigger::MaxWait => "max-wait",
        }
    }
}

struct PendingSeries {
    study_uid: String,
    instances: HashMap<String, InstanceHeader>,
    first_seen: Instant,
    last_seen: Instant,
    /// The open associations carrying it, with how many of its instances each has brought.
    carried_by: HashMap<AssociationId, usize>,
    revision: u32,
    /// An association that carried some of it has ended while it was pending.
    carrier_ended: bool,
    /// It came over associations one after another: a new one started carrying it after an
    /// earlier one that carried some of it had ended, or one released after bringing a single
    /// instance of it. Some senders (PACS routing rules, some modalities, a `storescu` per file)
    /// open an association per instance. Every release then shows a contiguous stack that is
    /// merely the part sent so far, so a release cannot mean "the series is all here": such a
    /// series is decided by its quiet period. Kept across a reopening, so a series sent that way
    /// is not decided again at each late instance.
    sent_in_turns: bool,
}

/// A decided series: its instances and revision, to recognise resends and late additions.
struct Decided {
    /// The [`fingerprint`]s of its instances' SOP instance UIDs, sorted; empty once retention has
    /// removed them. Kept for every decided series in the spool, so 8 bytes an instance rather
    /// than the UID itself: a spool of a million instances costs 8 MB, not a hundred.
    instances: Box<[u64]>,
    revision: u32,
    sent_in_turns: bool,
}

impl Decided {
    /// From the spool after a restart. How the series was sent is not recorded there; the next
    /// instances, if any, show it again.
    fn recovered(instances: Box<[u64]>, record: &SeriesRecord) -> Decided {
        Decided { instances, revision: record.revision, sent_in_turns: false }
    }

    fn holds(&self, sop_instance_uid: &str) -> bool {
        self.instances.binary_search(&fingerprint(sop_instance_uid)).is_ok()
    }
}

/// A SOP instance UID as 64 bits. Two UIDs of one series that collide (a chance of about one in
/// 10^13 for a series of 2000 instances) make a late instance pass for a resent one.
fn fingerprint(sop_instance_uid: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    sop_instance_uid.hash(&mut hasher);
    hasher.finish()
}

/// The sorted fingerprints of some SOP instance UIDs.
fn fingerprints<'a>(sop_instance_uids: impl IntoIterator<Item = &'a str>) -> Box<[u64]> {
    let mut all: Vec<u64> = sop_instance_uids.into_iter().map(fingerprint).collect();
    all.sort_unstable();
    all.dedup();
    all.into_boxed_slice()
}

/// The outcome of looking at a series' geometry.
#[derive(Debug, PartialEq)]
pub enum Assessment {
    /// A usable stack of this many slices (frames for multi-frame objects).
    Stack { slices: usize },
    /// Not usable as a volume, with the reason recorded for the administrator.
    Skip(String),
}

/// Judges whether the instances of a series form one CT volume the pipeline can use.
pub fn assess(instances: &[&InstanceHeader], config: &SeriesConfig) -> Assessment {
    if let Some(m) = instances.iter().filter_map(|h| h.modality.as_deref()).find(|m| *m != "CT") {
        return Assessment::Skip(format!("modality {m} is not CT"));
    }
    // A PACS that forwards whole studies sends the agent's key slices (CT images) back to it.
    if instances.iter().any(|h| h.manufacturer.as_deref() == Some(crate::common::MANUFACTURER)) {
        return Assessment::Skip("objects made by IDAICS (its key slices), not analysed again".into());
    }
    // A series of localizers is skipped; a localizer or two inside a series is set aside by the
    // geometry (another orientation) and the rest analysed.
    if instances.iter().all(|h| h.image_type.iter().any(|t| t == "LOCALIZER")) {
        return Assessment::Skip("localizer (scout) images".into());
    }
    if let Some(reason) = not_selected(instances, config) {
        return Assessment::Skip(reason);
    }
    let slices: usize = instances.iter().map(|h| h.number_of_frames as usize).sum();
    if slices < config.min_slices {
        return Assessment::Skip(format!("{slices} slice(s); at least {} needed for a volume", config.min_slices));
    }
    if instances.iter().any(|h| h.number_of_frames > 1) {
        // Enhanced CT carries per-frame geometry in functional groups; the volume stage checks it.
        return Assessment::Stack { slices };
    }
    // Set-aside strays and gaps do not stop a series: the volume stage analyses its blocks.
    match stack_blocks(instances, config) {
        Ok(_) => Assessment::Stack { slices },
        Err(reason) => Assessment::Skip(reason),
    }
}

/// Why the site's selection rules leave a series out, if they do.
///
/// A CT study holds, besides the axial acquisition, sagittal and coronal reformats of it and
/// reconstructions with other kernels or slice thicknesses. The pipeline analyses any of them
/// alike, so without these rules a study routed whole would send the PACS a report per
/// reformat on the same discs. A description is its series', so one instance whose description
/// matches a rule decides; an orientation decides when all instances but the few strays the
/// geometry check would set aside (a localizer inside a reformat series) agree on it; a series
/// more mixed than that is the geometry check's to name.
pub fn not_selected(instances: &[&InstanceHeader], config: &SeriesConfig) -> Option<String> {
    let descriptions: Vec<&str> = instances.iter().filter_map(|h| h.series_description.as_deref()).collect();
    let matching = |patterns: &[String]| -> Option<(String, String)> {
        patterns.iter().find_map(|p| {
            let pattern = p.to_lowercase();
            descriptions.iter().find(|d| d.to_lowercase().contains(&pattern)).map(|d| (d.to_string(), p.clone()))
        })
    };
    if let Some((description, pattern)) = matching(&config.exclude_descriptions) {
        return Some(format!("SeriesDescription {description:?} contains {pattern:?} (series.exclude_descriptions)"));
    }
    if !config.include_descriptions.is_empty() && matching(&config.include_descriptions).is_none() {
        let described = match descriptions.first() {
            Some(description) => format!("SeriesDescription {description:?} contains"),
            None => "no SeriesDescription: it contains".into(),
        };
        return Some(format!(
            "{described} none of series.include_descriptions ({})",
            config.include_descriptions.join(", ")
        ));
    }
    let kinds: Vec<&str> = instances.iter().filter_map(|h| h.image_orientation.and_then(stack_orientation)).collect();
    let kind = ["axial", "sagittal", "coronal"].into_iter().max_by_key(|k| kinds.iter().filter(|o| *o == k).count())?;
    let others = kinds.iter().filter(|&&o| o != kind).count();
    if kinds.is_empty()
        || others > MAX_STRAY_IMAGES.max(instances.len() / 10)
        || config.orientations.iter().any(|o| o == kind)
    {
        return None;
    }
    Some(format!(
        "{kind} stack, a reformat when the study holds the axial acquisition: series.orientations is {}",
        config.orientations.join(", ")
    ))
}

/// "axial", "sagittal" or "coronal": the patient axis the image normal follows most closely.
pub fn stack_orientation(orientation: [f64; 6]) -> Option<&'static str> {
    let normal =
        cross([orientation[0], orientation[1], orientation[2]], [orientation[3], orientation[4], orientation[5]]);
    let [x, y, z] = normal.map(f64::abs);
    if !(x + y + z).is_finite() || x + y + z < 1e-6 {
        return None;
    }
    Some(if z >= x && z >= y {
        "axial"
    } else if x >= y {
        "sagittal"
    } else {
        "coronal"
    })
}

/// Where the slices of a single-frame stack lie: the shared orientation, the instances in order
/// along the image normal, and the slice spacing.
#[derive(Debug, Clone, PartialEq)]
pub struct StackGeometry {
    /// Direction of increasing column index (ImageOrientationPatient's first triplet).
    pub row_direction: [f64; 3],
    /// Direction of increasing row index (its second triplet).
    pub column_direction: [f64; 3],
    /// `row_direction x column_direction`: the direction in which the sorted slices advance.
    pub normal: [f64; 3],
    /// Indices into the input, sorted along the normal.
    pub order: Vec<usize>,
    /// ImagePositionPatient of the first sorted slice.
    pub first_position: [f64; 3],
    /// Median distance between neighbouring slices, mm.
    pub spacing: f64,
    /// In-plane displacement (LPS mm) of a slice's origin per mm it lies along the normal: zero
    /// for a plain stack, `tan(tilt)` long for a gantry-tilted one (see [`crate::analysis::volume::Volume`]).
    pub shear: [f64; 3],
}

impl StackGeometry {
    /// The gantry tilt, degrees: the angle between the image normal and the line of slice origins.
    pub fn tilt_degrees(&self) -> f64 {
        tilt_degrees(self.shear)
    }
}

/// The angle of a shear (in-plane displacement per mm along the normal), degrees.
fn tilt_degrees(shear: [f64; 3]) -> f64 {
    dot(shear, shear).sqrt().atan().to_degrees()
}

/// Sorts single-frame slices along their normal and checks that they form one regular stack:
/// same orientation, no duplicates or gaps beyond the tolerance, positions along the normal.
pub fn stack_geometry(instances: &[&InstanceHeader], config: &SeriesConfig) -> Result<StackGeometry, String> {
    if instances.len() < 2 {
        return Err(format!("{} slice(s); a stack needs at least 2", instances.len()));
    }
    let mut geometry = Vec::with_capacity(instances.len());
    for h in instances {
        match (h.image_position, h.image_orientation) {
            (Some(p), Some(o)) => geometry.push((p, o)),
            _ => {
                return Err(format!(
                    "instance {} lacks ImagePositionPatient or ImageOrientationPatient",
                    h.sop_instance_uid
                ));
            }
        }
    }
    let orientation = geometry[0].1;
    if geometry.iter().any(|(_, o)| o.iter().zip(orientation.iter()).any(|(a, b)| (a - b).abs() > 1e-3)) {
        return Err("slices with different orientations".into());
    }
    let row = [orientation[0], orientation[1], orientation[2]];
    let col = [orientation[3], orientation[4], orientation[5]];
    let normal = cross(row, col);
    let norm = dot(normal, normal).sqrt();
    if !(0.9..1.1).contains(&norm) {
        return Err("ImageOrientationPatient is not two unit orthogonal vectors".into());
    }
    let normal = normal.map(|x| x / norm);
    let mut positions: Vec<(usize, [f64; 3], f64)> =
        geometry.iter().enumerate().map(|(i, (p, _))| (i, *p, dot(*p, normal))).collect();
    positions.sort_by(|a, b| a.2.total_cmp(&b.2));
    let gaps: Vec<f64> = positions.windows(2).map(|w| w[1].2 - w[0].2).collect();
    let mut sorted = gaps.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    if median < 1e-3 {
        return Err("most slices share one position (duplicates or several acquisitions)".into());
    }
    for (i, gap) in gaps.iter().enumerate() {
        if (gap - median).abs() > config.spacing_tolerance * median {
            let what = if *gap < 1e-3 {
                "duplicate slice position"
            } else if *gap > median {
                "gap (missing slices)"
            } else {
                "uneven spacing"
            };
            return Err(format!(
                "{what}: {gap:.2} mm between slices at {:.2} and {:.2} mm along the normal, median spacing {median:.2} mm",
                positions[i].2,
                positions[i + 1].2
            ));
        }
    }
    // Gantry tilt: the table moves along the patient axis while the image planes are tilted, so
    // each slice's origin also moves within the image plane, by the same amount per mm along the
    // normal (a shear). Fitted through the first slice by least squares; positions off that line
    // mean something other than a tilt (table jumps, several acquisitions).
    let first = positions[0].1;
    let along = |p: &(usize, [f64; 3], f64)| p.2 - positions[0].2;
    let in_plane = |p: &(usize, [f64; 3], f64)| -> [f64; 3] {
        let t = along(p);
        std::array::from_fn(|d| p.1[d] - first[d] - t * normal[d])
    };
    let moment: f64 = positions.iter().map(|p| along(p).powi(2)).sum();
    let mut shear = [0.0; 3];
    for p in &positions {
        let (t, offset) = (along(p), in_plane(p));
        for d in 0..3 {
            shear[d] += offset[d] * t / moment;
        }
    }
    let off_line = positions
        .iter()
        .map(|p| {
            let (t, offset) = (along(p), in_plane(p));
            (0..3).map(|d| (offset[d] - shear[d] * t).powi(2)).sum::<f64>().sqrt()
        })
        .fold(0.0, f64::max);
    // The volume puts every slice on the fitted line: an error well under a CT pixel (0.5 to
    // 1 mm) is harmless whatever the slice spacing, and rounded positions stay far inside it.
    const IN_PLANE_ALLOWANCE_MM: f64 = 0.3;
    let allowed = (config.spacing_tolerance * median).max(IN_PLANE_ALLOWANCE_MM);
    if off_line > allowed {
        return Err(format!(
            "slice positions off a straight line by up to {off_line:.2} mm (more than {allowed:.2} mm); \
             not one acquisition, or irregular table motion"
        ));
    }
    let tilt = tilt_degrees(shear);
    // Compared as printed, to a tenth of a degree: a scanner's 30 degrees fitted from rounded
    // positions comes out a hair above or below.
    if (tilt * 10.0).round() / 10.0 > config.max_tilt_degrees {
        return Err(format!(
            "oblique stack: slice positions deviate {tilt:.1} degrees from the image normal, more than series.max_tilt_degrees ({})",
            config.max_tilt_degrees
        ));
    }
    // Below this the shift across even a long stack stays far under a pixel; what remains is the
    // rounding of the positions, not a tilt.
    const NEGLIGIBLE_TILT_DEGREES: f64 = 0.01;
    Ok(StackGeometry {
        row_direction: row,
        column_direction: col,
        normal,
        order: positions.iter().map(|p| p.0).collect(),
        first_position: first,
        spacing: median,
        shear: if tilt < NEGLIGIBLE_TILT_DEGREES { [0.0; 3] } else { shear },
    })
}

/// A series as archives hold it: the contiguous stacks it is made of, in order along their
/// normal, with what was set aside.
#[derive(Debug, Clone, PartialEq)]
pub struct StackBlocks {
    /// Each a regular stack ([`stack_geometry`]) whose `order` indexes the input.
    pub blocks: Vec<StackGeometry>,
    /// Input indices not in any block: images of another orientation (a localizer inside the
    /// series), and blocks too short to hold a disc.
    pub set_aside: Vec<usize>,
    /// What was split or set aside and why, for the log and the report.
    pub notes: Vec<String>,
}

/// A block shorter than this along its normal cannot show a disc with the bodies around it, mm.
pub const MIN_BLOCK_MM: f64 = 30.0;

/// Splits a series into the contiguous stacks it holds. Images of another orientation are set
/// aside when they are few (a localizer or two inside a reformat series); a series made of
/// several substantial stacks at different angles (disc-parallel blocks) is refused, since no one
/// volume holds them. The main stack is cut where slices are missing (the archive lost some, or
/// a block was never sent): each side is a block of its own, analysed in its own geometry.
pub fn stack_blocks(instances: &[&InstanceHeader], config: &SeriesConfig) -> Result<StackBlocks, String> {
    let mut groups: Vec<([f64; 6], Vec<usize>)> = Vec::new();
    for (index, h) in instances.iter().enumerate() {
        let (Some(_), Some(o)) = (h.image_position, h.image_orientation) else {
            return Err(format!(
                "instance {} lacks ImagePositionPatient or ImageOrientationPatient",
                h.sop_instance_uid
            ));
        };
        match groups.iter_mut().find(|(g, _)| g.iter().zip(o.iter()).all(|(a, b)| (a - b).abs() <= 1e-3)) {
            Some((_, members)) => members.push(index),
            None => groups.push((o, vec![index])),
        }
    }
    groups.sort_by_key(|(_, members)| std::cmp::Reverse(members.len()));
    let mut notes = Vec::new();
    let mut set_aside: Vec<usize> = Vec::new();
    let others: usize = groups.iter().skip(1).map(|(_, m)| m.len()).sum();
    if others > 0 {
        // A localizer or two: set aside. More: several stacks at different angles.
        let allowed = MAX_STRAY_IMAGES.max(instances.len() / 10);
        if others > allowed {
            return Err(format!(
                "slices with different orientations: {} stacks at different angles ({} images outside the largest), \
                 such as disc-parallel blocks; no single volume holds them",
                groups.len(),
                others
            ));
        }
        for (_, members) in groups.iter().skip(1) {
            set_aside.extend(members);
        }
        notes.push(format!("{others} image(s) of another orientation set aside (a localizer inside the series)"));
    }
    let main = &groups[0].1;
    let headers: Vec<&InstanceHeader> = main.iter().map(|&i| instances[i]).collect();
    let along = positions_along_normal(&headers)?;
    let mut order: Vec<usize> = (0..headers.len()).collect();
    order.sort_by(|&a, &b| along[a].total_cmp(&along[b]));
    let gaps: Vec<f64> = order.windows(2).map(|w| along[w[1]] - along[w[0]]).collect();
    let mut sorted = gaps.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
    // Cut at every gap wider than the tolerance; other irregularities are the stack check's.
    let mut runs: Vec<Vec<usize>> = vec![Vec::new()];
    for (position, &index) in order.iter().enumerate() {
        if position > 0 && median > 1e-3 && gaps[position - 1] > (1.0 + config.spacing_tolerance) * median {
            notes.push(format!(
                "gap (missing slices): {:.2} mm between slices at {:.2} and {:.2} mm along the normal, median spacing {median:.2} mm",
                gaps[position - 1],
                along[order[position - 1]],
                along[index]
            ));
            runs.push(Vec::new());
        }
        runs.last_mut().expect("one run at least").push(index);
    }
    let mut blocks = Vec::new();
    let mut first_error = None;
    for run in &runs {
        let extent = along[run[run.len() - 1]] - along[run[0]];
        if runs.len() > 1 && extent < MIN_BLOCK_MM {
            notes.push(format!(
                "{} slice(s) between {:.2} and {:.2} mm set aside: a block under {MIN_BLOCK_MM} mm holds no disc with its bodies",
                run.len(),
                along[run[0]],
                along[run[run.len() - 1]]
            ));
            set_aside.extend(run.iter().map(|&i| main[i]));
            continue;
        }
        let run_headers: Vec<&InstanceHeader> = run.iter().map(|&i| headers[i]).collect();
        match stack_geometry(&run_headers, config) {
            Ok(mut geometry) => {
                geometry.order = geometry.order.iter().map(|&i| main[run[i]]).collect();
                blocks.push(geometry);
            }
            Err(reason) => {
                first_error.get_or_insert(reason);
            }
        }
    }
    if let Some(reason) = first_error {
        return Err(reason);
    }
    if blocks.is_empty() {
        return Err(notes.join("; "));
    }
    set_aside.sort_unstable();
    Ok(StackBlocks { blocks, set_aside, notes })
}

/// At most this many images of another orientation are set aside as strays in a series (or a
/// tenth of it, if more); more make it several stacks.
const MAX_STRAY_IMAGES: usize = 3;

/// Each slice's position along the normal that slices of one orientation share.
fn positions_along_normal(instances: &[&InstanceHeader]) -> Result<Vec<f64>, String> {
    let orientation = instances.first().and_then(|h| h.image_orientation).ok_or("no slices")?;
    let normal =
        cross([orientation[0], orientation[1], orientation[2]], [orientation[3], orientation[4], orientation[5]]);
    let norm = dot(normal, normal).sqrt();
    if !(0.9..1.1).contains(&norm) {
        return Err("ImageOrientationPatient is not two unit orthogonal vectors".into());
    }
    let normal = normal.map(|x| x / norm);
    Ok(instances.iter().map(|h| h.image_position.map_or(0.0, |p| dot(p, normal))).collect())
}

/// Tracks pending series and decides them. Owned by one task; fed through [`TrackerEvent`]s.
pub struct SeriesTracker {
    config: SeriesConfig,
    spool: Arc<Spool>,
    pending: HashMap<String, PendingSeries>,
    /// Decided series by UID. A purged series keeps its revision with no instances: anything
    /// sent again reopens it.
    decided: HashMap<String, Decided>,
    decisions: mpsc::UnboundedSender<DecidedSeries>,
}

impl SeriesTracker {
    /// Rebuilds the tracker from a scan of the spool ([`Spool::scan`]): decided series are
    /// remembered, undecided ones become pending again with a fresh quiet period. Blocking (reads
    /// headers).
    pub fn recover(
        config: SeriesConfig,
        spool: Arc<Spool>,
        decisions: mpsc::UnboundedSender<DecidedSeries>,
        scanned: &[crate::ingest::spool::SpooledSeries],
    ) -> Result<SeriesTracker, SpoolError> {
        let mut tracker = SeriesTracker { config, spool, pending: HashMap::new(), decided: HashMap::new(), decisions };
        let now = Instant::now();
        let mut recovered_instances = 0;
        for series in scanned {
            match &series.record {
                // Removed by retention: remembered with its revision and no instances.
                Some(record) if record.purged_at.is_some() && series.instances == 0 => {
                    tracker
                        .decided
                        .insert(series.series_instance_uid.clone(), Decided::recovered(Box::new([]), record));
                }
                // Instances of a removed series are ones sent again since: pending, below.
                Some(record) if record.purged_at.is_none() && record.instances == series.instances => {
                    let files = crate::ingest::spool::instance_files(&series.dir)?;
                    let instances = fingerprints(files.iter().filter_map(|p| p.file_stem()?.to_str()));
                    tracker.decided.insert(series.series_instance_uid.clone(), Decided::recovered(instances, record));
                }
                record => {
                    let files = crate::ingest::spool::instance_files(&series.dir)?;
                    let instances = read_headers(files.iter().map(|p| p.as_path()));
                    if instances.is_empty() {
                        continue;
                    }
                    recovered_instances += instances.len();
                    tracing::info!(
                        series_uid = %series.series_instance_uid,
                        instances = instances.len(),
                        "recovered pending series from the spool"
                    );
                    let revision = record.as_ref().map_or(0, |r| r.revision);
                    tracker.pending.insert(
                        series.series_instance_uid.clone(),
                        PendingSeries::new(series.study_instance_uid.clone(), instances, revision, now),
                    );
                }
            }
        }
        tracing::info!(
            pending = tracker.pending.len(),
            decided = tracker.decided.len(),
            recovered_instances,
            "series state rebuilt from the spool"
        );
        Ok(tracker)
    }

    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    pub fn handle(&mut self, event: TrackerEvent) {
        match event {
            TrackerEvent::Stored { association, header } => self.on_stored(association, *header),
            TrackerEvent::AssociationEnded { association, released } => {
                let carried: Vec<(String, usize)> = self
                    .pending
                    .iter_mut()
                    .filter_map(|(uid, s)| {
                        let brought = s.carried_by.remove(&association)?;
                        s.carrier_ended = true;
                        Some((uid.clone(), brought))
                    })
                    .collect();
                if released && self.config.complete_on_release {
                    for (uid, brought) in carried {
                        self.try_complete_on_release(&uid, brought);
                    }
                }
            }
            TrackerEvent::Purge { study_uid, series_uid, asked_at, outputs, done } => {
                let _ = done.send(self.purge(&study_uid, &series_uid, asked_at, &outputs));
            }
        }
    }

    /// Removes a decided series' instances and its job's objects, and says whether nothing of it
    /// is left. Not a series reopened since the database was asked (it is pending again), nor
    /// one this agent does not know as decided.
    fn purge(&mut self, study_uid: &str, series_uid: &str, asked_at: std::time::SystemTime, outputs: &Path) -> bool {
        let Some(decided) = self.decided.get_mut(series_uid) else { return false };
        if decided.instances.is_empty() {
            return true; // purged before; the database did not hear of it
        }
        match self.spool.purge_series(study_uid, series_uid, |sop| decided.holds(sop), asked_at) {
            Ok(removed) => {
                decided.instances = Box::new([]);
                if let Err(e) = std::fs::remove_dir_all(outputs)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    tracing::warn!(series_uid, error = %e, dir = %outputs.display(), "cannot remove the series' outputs");
                }
                tracing::info!(
                    series_uid,
                    instances = removed,
                    "series removed from the spool after its retention period"
                );
                true
            }
            Err(e) => {
                tracing::warn!(series_uid, error = %e, "cannot remove the series from the spool; retrying later");
                false
            }
        }
    }

    fn on_stored(&mut self, association: AssociationId, header: InstanceHeader) {
        let now = Instant::now();
        let series_uid = header.series_instance_uid.clone();
        if let Some(decided) = self.decided.get(&series_uid) {
            if decided.holds(&header.sop_instance_uid) {
                tracing::debug!(series_uid = %series_uid, sop_uid = %header.sop_instance_uid, "resent instance of a decided series");
                return;
            }
            let decided = self.decided.remove(&series_uid).expect("just found");
            tracing::info!(series_uid = %series_uid, "new instance for a decided series: reopening it");
            let dir = self.spool.series_dir(&header.study_instance_uid, &series_uid);
            // The instances it was decided on; the new one is added below, and any other new one
            // when its own event arrives.
            let files: Vec<std::path::PathBuf> = crate::ingest::spool::instance_files(&dir)
                .unwrap_or_else(|e| {
                    tracing::warn!(series_uid = %series_uid, error = %e, "cannot list the series' instances");
                    Vec::new()
                })
                .into_iter()
                .filter(|p| p.file_stem().and_then(|sop| sop.to_str()).is_some_and(|sop| decided.holds(sop)))
                .collect();
            let instances = read_headers(files.iter().map(|p| p.as_path()));
            let mut reopened = PendingSeries::new(header.study_instance_uid.clone(), instances, decided.revision, now);
            reopened.sent_in_turns = decided.sent_in_turns;
            self.pending.insert(series_uid.clone(), reopened);
        }
        let series = self
            .pending
            .entry(series_uid)
            .or_insert_with(|| PendingSeries::new(header.study_instance_uid.clone(), HashMap::new(), 0, now));
        series.last_seen = now;
        let brought = series.carried_by.entry(association).or_default();
        *brought += 1;
        if *brought == 1 && series.carrier_ended && !series.sent_in_turns {
            series.sent_in_turns = true;
            log_sent_in_turns(&header.series_instance_uid);
        }
        series.instances.insert(header.sop_instance_uid.clone(), header);
    }

    /// `brought`: how many of the series' instances the released association carried.
    fn try_complete_on_release(&mut self, series_uid: &str, brought: usize) {
        let Some(series) = self.pending.get_mut(series_uid) else { return };
        if !series.carried_by.is_empty() || series.sent_in_turns {
            return; // another association is still sending it, or release says nothing of it
        }
        if brought == 1 && series.instances.len() > 1 {
            // One instance of a larger series, then a release: a sender that opens an association
            // per instance. The tracker usually sees that from the associations before, but not
            // for a series recovered after a restart, whose earlier carriers it never saw end, nor
            // for the first late instance of a series decided at an earlier release.
            series.sent_in_turns = true;
            log_sent_in_turns(series_uid);
            return;
        }
        let headers: Vec<&InstanceHeader> = series.instances.values().collect();
        let stated_total = headers.iter().filter_map(|h| h.images_in_acquisition).max();
        let slices: usize = headers.iter().map(|h| h.number_of_frames as usize).sum();
        if stated_total.is_some_and(|total| slices < total as usize) {
            return;
        }
        // A series the selection rules leave out stays out whatever else arrives: it is
        // skipped now, not after the quiet period.
        if not_selected(&headers, &self.config).is_some()
            || matches!(assess(&headers, &self.config), Assessment::Stack { .. })
        {
            self.decide(series_uid, Trigger::AssociationReleased);
        }
    }

    /// Decides series whose quiet period or maximum wait has passed.
    pub fn tick(&mut self, now: Instant) {
        let due: Vec<(String, Trigger)> = self
            .pending
            .iter()
            .filter_map(|(uid, s)| {
                if now.duration_since(s.first_seen) >= self.config.max_wait() {
                    Some((uid.clone(), Trigger::MaxWait))
                } else if now.duration_since(s.last_seen) >= self.config.quiet_period() {
                    Some((uid.clone(), Trigger::QuietPeriod))
                } else {
                    None
                }
            })
            .collect();
        for (uid, trigger) in due {
            self.decide(&uid, trigger);
        }
    }

    fn decide(&mut self, series_uid: &str, trigger: Trigger) {
        let Some(series) = self.pending.remove(series_uid) else { return };
        let headers: Vec<&InstanceHeader> = series.instances.values().collect();
        let assessment = assess(&headers, &self.config);
        let (state, skip_reason, slices) = match assessment {
            Assessment::Stack { slices } => ("complete", None, slices),
            Assessment::Skip(reason) => {
                ("skipped", Some(reason), headers.iter().map(|h| h.number_of_frames as usize).sum())
            }
        };
        let record = SeriesRecord {
            study_instance_uid: series.study_uid.clone(),
            series_instance_uid: series_uid.to_string(),
            state: state.to_string(),
            skip_reason,
            trigger: trigger.as_str().to_string(),
            instances: series.instances.len(),
            slices,
            revision: series.revision + 1,
            decided_at: now_rfc3339(),
            purged_at: None,
        };
        if let Err(e) = self.spool.write_series_record(&record) {
            // Keep it pending: the decision is retried at the next tick rather than lost.
            tracing::error!(series_uid, error = %e, "cannot record series decision; will retry");
            self.pending.insert(series_uid.to_string(), series);
            return;
        }
        match &record.skip_reason {
            None => tracing::info!(
                series_uid, study_uid = %record.study_instance_uid, trigger = %record.trigger,
                slices = record.slices, revision = record.revision, "series complete"
            ),
            Some(reason) => tracing::info!(
                series_uid, study_uid = %record.study_instance_uid, trigger = %record.trigger,
                slices = record.slices, reason = %reason, "series skipped"
            ),
        }
        let instances = fingerprints(series.instances.keys().map(String::as_str));
        self.decided.insert(
            series_uid.to_string(),
            Decided { instances, revision: record.revision, sent_in_turns: series.sent_in_turns },
        );
        let dir = self.spool.series_dir(&record.study_instance_uid, series_uid);
        let _ = self.decisions.send(DecidedSeries { dir, record });
    }
}

/// Runs the tracker until the event channel closes.
pub async fn run_tracker(
    mut tracker: SeriesTracker,
    mut events: mpsc::UnboundedReceiver<TrackerEvent>,
    heartbeat: crate::systemd::Heartbeat,
) {
    let period = (tracker.config.quiet_period() / 4)
        .clamp(std::time::Duration::from_millis(100), std::time::Duration::from_secs(1));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        heartbeat.beat();
        tokio::select! {
            event = events.recv() => match event {
                Some(event) => tokio::task::block_in_place(|| tracker.handle(event)),
                None => break,
            },
            _ = ticker.tick() => tokio::task::block_in_place(|| tracker.tick(Instant::now())),
        }
    }
    tracing::debug!(pending = tracker.pending_count(), "series tracker stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(i: usize, z: f64) -> InstanceHeader {
        InstanceHeader {
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
            sop_instance_uid: format!("1.2.3.{i}"),
            study_instance_uid: "1.2.3".into(),
            series_instance_uid: "1.2.3.4".into(),
            transfer_syntax_uid: "1.2.840.10008.1.2.1".into(),
            modality: Some("CT".into()),
            manufacturer: Some("SCANNER".into()),
            image_type: vec!["ORIGINAL".into(), "PRIMARY".into(), "AXIAL".into()],
            series_description: Some("LUMBAR SPINE 1.0 BONE".into()),
            instance_number: Some(i as i32),
            image_position: Some([-100.0, -100.0, z]),
            image_orientation: Some([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]),
            number_of_frames: 1,
            images_in_acquisition: None,
            lossy_image_compression: false,
            patient_id: String::new(),
        }
    }

    fn judge(slices: &[InstanceHeader]) -> Assessment {
        let refs: Vec<&InstanceHeader> = slices.iter().collect();
        assess(&refs, &SeriesConfig::default())
    }

    #[test]
    fn contiguous_stack_in_any_order_is_complete() {
        let mut s: Vec<_> = (0..20).map(|i| slice(i, i as f64 * 1.25)).collect();
        s.reverse();
        s.swap(3, 11);
        assert_eq!(judge(&s), Assessment::Stack { slices: 20 });
    }

    /// A gantry tilt: origins advance along z while the image planes tilt about the left-right
    /// axis. A stack, with its shear, up to `series.max_tilt_degrees`; oblique beyond it.
    #[test]
    fn gantry_tilted_stack_is_a_stack_with_its_shear_up_to_the_limit() {
        let degrees: f64 = 16.0;
        let (sin, cos) = degrees.to_radians().sin_cos();
        let tilted: Vec<_> = (0..20)
            .map(|i| {
                let mut h = slice(i, -(i as f64) * 1.25);
                h.image_orientation = Some([1.0, 0.0, 0.0, 0.0, cos, sin]);
                h
            })
            .collect();
        assert_eq!(judge(&tilted), Assessment::Stack { slices: 20 });
        let refs: Vec<&InstanceHeader> = tilted.iter().collect();
        let geometry = stack_geometry(&refs, &SeriesConfig::default()).unwrap();
        assert!((geometry.tilt_degrees() - degrees).abs() < 1e-6, "{}", geometry.tilt_degrees());
        assert!((geometry.spacing - 1.25 * cos).abs() < 1e-9);
        // In the image plane, along its columns.
        assert!(dot(geometry.shear, geometry.normal).abs() < 1e-9);
        assert!(dot(geometry.shear, geometry.row_direction).abs() < 1e-9);

        let strict = SeriesConfig { max_tilt_degrees: 10.0, ..SeriesConfig::default() };
        let outcome = assess(&refs, &strict);
        assert!(
            matches!(&outcome, Assessment::Skip(r) if r.contains("oblique") && r.contains("16.0 degrees")),
            "{outcome:?}"
        );
        // A plain stack has none.
        let plain: Vec<_> = (0..20).map(|i| slice(i, i as f64)).collect();
        let refs: Vec<&InstanceHeader> = plain.iter().collect();
        assert_eq!(stack_geometry(&refs, &strict).unwrap().shear, [0.0; 3]);
    }

    #[test]
    fn skip_reasons_are_specific() {
        let gappy: Vec<_> = (0..20).filter(|i| *i != 7).map(|i| slice(i, i as f64)).collect();
        assert!(matches!(judge(&gappy), Assessment::Skip(r) if r.contains("gap")));

        let mut dup: Vec<_> = (0..20).map(|i| slice(i, i as f64)).collect();
        dup.push(slice(99, 5.0));
        assert!(matches!(judge(&dup), Assessment::Skip(r) if r.contains("duplicate")));

        // Slice origins off a straight line: not a gantry tilt, and nothing to correct.
        let wobbly: Vec<_> = (0..20)
            .map(|i| {
                let mut h = slice(i, i as f64);
                h.image_position = Some([-100.0, -100.0 + if i % 2 == 0 { 0.0 } else { 0.5 }, i as f64]);
                h
            })
            .collect();
        assert!(matches!(judge(&wobbly), Assessment::Skip(r) if r.contains("straight line")), "{:?}", judge(&wobbly));

        let mut scout = vec![slice(0, 0.0), slice(1, 1.0)];
        scout.iter_mut().for_each(|h| h.image_type = vec!["ORIGINAL".into(), "PRIMARY".into(), "LOCALIZER".into()]);
        assert!(matches!(judge(&scout), Assessment::Skip(r) if r.contains("localizer")));

        // The agent's own key slices, sent back by a PACS; a series made by another program
        // whose name starts the same way is not.
        let mut own: Vec<_> = (0..20).map(|i| slice(i, i as f64)).collect();
        own.iter_mut().for_each(|h| h.manufacturer = Some(crate::common::MANUFACTURER.into()));
        assert!(matches!(judge(&own), Assessment::Skip(r) if r.contains("made by IDAICS")));
        own.iter_mut().for_each(|h| h.manufacturer = Some("IDAICS synthetic".into()));
        assert_eq!(judge(&own), Assessment::Stack { slices: 20 });

        assert!(matches!(judge(&[slice(0, 0.0)]), Assessment::Skip(r) if r.contains("1 slice")));

        let mut mr: Vec<_> = (0..5).map(|i| slice(i, i as f64)).collect();
        mr[2].modality = Some("MR".into());
        assert!(matches!(judge(&mr), Assessment::Skip(r) if r.contains("MR")));

        // A stray image of another orientation (a localizer) is set aside; two stacks at different
        // angles make no volume.
        let mut stray: Vec<_> = (0..6).map(|i| slice(i, i as f64)).collect();
        stray[5].image_orientation = Some([0.0, 1.0, 0.0, 0.0, 0.0, -1.0]);
        assert_eq!(judge(&stray), Assessment::Stack { slices: 6 });
        let mut mixed: Vec<_> = (0..10).map(|i| slice(i, i as f64)).collect();
        mixed[5..].iter_mut().for_each(|h| h.image_orientation = Some([1.0, 0.0, 0.0, 0.0, 0.966, -0.259]));
        assert!(matches!(judge(&mixed), Assessment::Skip(r) if r.contains("orientations")));
    }

    #[test]
    fn sagittal_stack_is_judged_along_its_own_normal() {
        let s: Vec<_> = (0..10)
            .map(|i| {
                let mut h = slice(i, 0.0);
                h.image_orientation = Some([0.0, 1.0, 0.0, 0.0, 0.0, -1.0]);
                h.image_position = Some([i as f64 * 0.8, -120.0, 50.0]);
                h
            })
            .collect();
        let refs: Vec<&InstanceHeader> = s.iter().collect();
        let config = SeriesConfig { orientations: vec!["axial".into(), "sagittal".into()], ..Default::default() };
        assert_eq!(assess(&refs, &config), Assessment::Stack { slices: 10 });
    }

    /// A study routed whole brings reformats and other reconstructions: the site's rules say
    /// which series are analysed, and a skipped one says which rule left it out.
    #[test]
    fn selection_rules_leave_out_reformats_and_named_series() {
        let stack = |orientation: [f64; 6], description: &str| -> Vec<InstanceHeader> {
            let normal = crate::geometry::cross(
                [orientation[0], orientation[1], orientation[2]],
                [orientation[3], orientation[4], orientation[5]],
            );
            (0..10)
                .map(|i| {
                    let mut h = slice(i, 0.0);
                    h.image_orientation = Some(orientation);
                    h.image_position = Some(normal.map(|n| n * i as f64 * 2.0));
                    h.series_description = Some(description.into());
                    h
                })
                .collect()
        };
        let axial = stack([1.0, 0.0, 0.0, 0.0, 1.0, 0.0], "Spine 1.0 Bone");
        let sagittal = stack([0.0, 1.0, 0.0, 0.0, 0.0, -1.0], "SAG MPR 3mm");
        let coronal = stack([1.0, 0.0, 0.0, 0.0, 0.0, -1.0], "COR MPR 3mm");
        let judge_with =
            |slices: &[InstanceHeader], config: &SeriesConfig| assess(&slices.iter().collect::<Vec<_>>(), config);
        let defaults = SeriesConfig::default();
        assert_eq!(judge_with(&axial, &defaults), Assessment::Stack { slices: 10 });
        assert!(matches!(judge_with(&sagittal, &defaults),
            Assessment::Skip(r) if r.starts_with("sagittal stack") && r.contains("series.orientations is axial")));
        assert!(matches!(judge_with(&coronal, &defaults), Assessment::Skip(r) if r.starts_with("coronal stack")));
        let all = SeriesConfig {
            orientations: crate::config::STACK_ORIENTATIONS.map(String::from).to_vec(),
            ..Default::default()
        };
        for s in [&axial, &sagittal, &coronal] {
            assert_eq!(judge_with(s, &all), Assessment::Stack { slices: 10 });
        }
        let excluding = SeriesConfig { exclude_descriptions: vec!["mpr".into()], ..all.clone() };
        assert!(matches!(judge_with(&sagittal, &excluding),
            Assessment::Skip(r) if r.contains("\"SAG MPR 3mm\" contains \"mpr\" (series.exclude_descriptions)")));
        assert_eq!(judge_with(&axial, &excluding), Assessment::Stack { slices: 10 });
        let including = SeriesConfig { include_descriptions: vec!["BONE".into()], ..all.clone() };
        assert_eq!(judge_with(&axial, &including), Assessment::Stack { slices: 10 });
        assert!(matches!(judge_with(&coronal, &including),
            Assessment::Skip(r) if r.contains("none of series.include_descriptions (BONE)")));
        let mut unnamed = axial.clone();
        unnamed.iter_mut().for_each(|h| h.series_description = None);
        assert!(matches!(judge_with(&unnamed, &including),
            Assessment::Skip(r) if r == "no SeriesDescription: it contains none of series.include_descriptions (BONE)"));
        assert_eq!(judge_with(&unnamed, &excluding), Assessment::Stack { slices: 10 });
        // Mixed orientations are named as such by the geometry check, whichever instance is first;
        // a single stray is set aside.
        let mut mixed = sagittal.clone();
        mixed[..5].iter_mut().zip(&axial).for_each(|(h, a)| h.image_orientation = a.image_orientation);
        assert!(matches!(judge_with(&mixed, &defaults), Assessment::Skip(r) if r.contains("different orientations")));
        // A stray axial localizer, first or not, neither makes a sagittal reformat series mixed
        // nor lets it pass for an axial one.
        for position in [0, 9] {
            let mut stray = sagittal.clone();
            stray[position].image_orientation = axial[0].image_orientation;
            assert!(!matches!(judge_with(&stray, &all), Assessment::Skip(r) if r.contains("orientations")));
            assert!(matches!(judge_with(&stray, &defaults), Assessment::Skip(r) if r.starts_with("sagittal stack")));
        }
    }
}
