//! YCSB's CoreWorkload: the properties of workloads A–F (as in YCSB's `workloads/`
//! files), overridable one by one, and the operation stream of one client thread.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;

use rand::rngs::SmallRng;
use rand::Rng;

use super::generator::{key_name, AcknowledgedCounter, Discrete, ScrambledZipfian, SkewedLatest};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Distribution {
    Uniform,
    Zipfian,
    Latest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Read,
    Update,
    Insert,
    Scan,
    ReadModifyWrite,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "READ",
            Op::Update => "UPDATE",
            Op::Insert => "INSERT",
            Op::Scan => "SCAN",
            Op::ReadModifyWrite => "READ-MODIFY-WRITE",
        }
    }
}

/// CoreWorkload properties (names as YCSB spells them).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Workload {
    pub name: String,
    pub recordcount: u64,
    pub operationcount: u64,
    pub fieldcount: u32,
    pub fieldlength: u32,
    pub readproportion: f64,
    pub updateproportion: f64,
    pub insertproportion: f64,
    pub scanproportion: f64,
    pub readmodifywriteproportion: f64,
    pub requestdistribution: Distribution,
    pub minscanlength: u64,
    pub maxscanlength: u64,
    /// `hashed` (keys are FNV hashes of their numbers) or `ordered`.
    pub insertorder_hashed: bool,
    pub insertstart: u64,
    /// Records this client loads (`insertcount`; default: all of `recordcount`).
    pub insertcount: u64,
    pub writeallfields: bool,
}

impl Workload {
    /// Workload `a`..`f` with YCSB's defaults (`recordcount` 1000 as in its files;
    /// the bench sets its own).
    pub fn preset(name: &str) -> anyhow::Result<Workload> {
        let mut w = Workload {
            name: name.to_ascii_lowercase(),
            recordcount: 1000,
            operationcount: 1000,
            fieldcount: 10,
            fieldlength: 100,
            readproportion: 0.95,
            updateproportion: 0.05,
            insertproportion: 0.0,
            scanproportion: 0.0,
            readmodifywriteproportion: 0.0,
            requestdistribution: Distribution::Zipfian,
            minscanlength: 1,
            maxscanlength: 100,
            insertorder_hashed: true,
            insertstart: 0,
            insertcount: 0,
            writeallfields: false,
        };
        match w.name.as_str() {
            "a" => (w.readproportion, w.updateproportion) = (0.5, 0.5),
            "b" => (w.readproportion, w.updateproportion) = (0.95, 0.05),
            "c" => (w.readproportion, w.updateproportion) = (1.0, 0.0),
            "d" => {
                (w.readproportion, w.updateproportion, w.insertproportion) = (0.95, 0.0, 0.05);
                w.requestdistribution = Distribution::Latest;
            }
            "e" => {
                (w.readproportion, w.updateproportion) = (0.0, 0.0);
                (w.scanproportion, w.insertproportion) = (0.95, 0.05);
            }
            "f" => {
                (w.readproportion, w.updateproportion) = (0.5, 0.0);
                w.readmodifywriteproportion = 0.5;
            }
            other => anyhow::bail!("unknown workload {other:?}: a, b, c, d, e or f"),
        }
        Ok(w)
    }

    /// Sets one property (`-p name=value`).
    pub fn set(&mut self, name: &str, value: &str) -> anyhow::Result<()> {
        let num = |v: &str| -> anyhow::Result<u64> {
            v.parse()
                .map_err(|_| anyhow::anyhow!("{name}={v}: not a whole number"))
        };
        let frac = |v: &str| -> anyhow::Result<f64> {
            let x: f64 = v
                .parse()
                .map_err(|_| anyhow::anyhow!("{name}={v}: not a number"))?;
            anyhow::ensure!((0.0..=1.0).contains(&x), "{name}={v}: must be within 0..=1");
            Ok(x)
        };
        match name {
            "recordcount" => self.recordcount = num(value)?,
            "operationcount" => self.operationcount = num(value)?,
            "fieldcount" => self.fieldcount = num(value)?.clamp(1, 1000) as u32,
            "fieldlength" => self.fieldlength = num(value)?.clamp(1, 1 << 20) as u32,
            "readproportion" => self.readproportion = frac(value)?,
            "updateproportion" => self.updateproportion = frac(value)?,
            "insertproportion" => self.insertproportion = frac(value)?,
            "scanproportion" => self.scanproportion = frac(value)?,
            "readmodifywriteproportion" => self.readmodifywriteproportion = frac(value)?,
            "requestdistribution" => {
                self.requestdistribution = match value {
                    "uniform" => Distribution::Uniform,
                    "zipfian" => Distribution::Zipfian,
                    "latest" => Distribution::Latest,
                    other => {
                        anyhow::bail!("requestdistribution={other}: uniform, zipfian or latest")
                    }
                }
            }
            "minscanlength" => self.minscanlength = num(value)?.max(1),
            "maxscanlength" => self.maxscanlength = num(value)?.max(1),
            "insertorder" => {
                self.insertorder_hashed = match value {
                    "hashed" => true,
                    "ordered" => false,
                    other => anyhow::bail!("insertorder={other}: hashed or ordered"),
                }
            }
            "insertstart" => self.insertstart = num(value)?,
            "insertcount" => self.insertcount = num(value)?,
            "writeallfields" => self.writeallfields = value == "true",
            other => anyhow::bail!("unknown property {other:?}"),
        }
        Ok(())
    }

    /// Records loaded by this client.
    pub fn records_to_load(&self) -> u64 {
        if self.insertcount == 0 {
            self.recordcount.saturating_sub(self.insertstart)
        } else {
            self.insertcount
        }
    }

    pub fn key(&self, keynum: u64) -> String {
        key_name(keynum as i64, self.insertorder_hashed)
    }

    /// A record of `fields` (field name, random printable bytes), encoded as one value:
    /// `name=value` pairs separated by `\x1f`. The bytes are YCSB's `RandomByteIterator`
    /// alphabet, 5 random bits per character from ' '..='?' (YCSB takes six from each
    /// random 32-bit number, this takes twelve from each 64-bit one). Drawing one
    /// number per byte cost 4 % of a load's CPU; this is written in place, with no
    /// allocation per field.
    pub fn record(&self, rng: &mut SmallRng, fields: &[u32]) -> Vec<u8> {
        let length = self.fieldlength as usize;
        let mut out = Vec::with_capacity(fields.len() * (length + 12));
        for (i, field) in fields.iter().enumerate() {
            if i > 0 {
                out.push(0x1f);
            }
            let _ = write!(out, "field{field}=");
            let start = out.len();
            out.resize(start + length, 0);
            for chunk in out[start..].chunks_mut(12) {
                let bits: u64 = rng.gen();
                for (j, byte) in chunk.iter_mut().enumerate() {
                    *byte = b' ' + ((bits >> (5 * j)) & 31) as u8;
                }
            }
        }
        out
    }

    pub fn all_fields(&self) -> Vec<u32> {
        (0..self.fieldcount).collect()
    }

    pub fn as_properties(&self) -> BTreeMap<&'static str, String> {
        BTreeMap::from([
            ("recordcount", self.recordcount.to_string()),
            ("operationcount", self.operationcount.to_string()),
            ("fieldcount", self.fieldcount.to_string()),
            ("fieldlength", self.fieldlength.to_string()),
            ("readproportion", self.readproportion.to_string()),
            ("updateproportion", self.updateproportion.to_string()),
            ("insertproportion", self.insertproportion.to_string()),
            ("scanproportion", self.scanproportion.to_string()),
            (
                "readmodifywriteproportion",
                self.readmodifywriteproportion.to_string(),
            ),
            (
                "requestdistribution",
                format!("{:?}", self.requestdistribution).to_lowercase(),
            ),
            ("maxscanlength", self.maxscanlength.to_string()),
        ])
    }
}

/// What one operation of the run phase does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Read {
        key: String,
    },
    Update {
        key: String,
        fields: Vec<u32>,
    },
    /// Insert of key number `keynum` (acknowledged to the counter once done).
    Insert {
        keynum: u64,
        key: String,
    },
    Scan {
        start: String,
        count: u64,
    },
    ReadModifyWrite {
        key: String,
        fields: Vec<u32>,
    },
}

enum KeyChooser {
    Uniform { low: u64, high: u64 },
    Zipfian(ScrambledZipfian),
    Latest(SkewedLatest),
}

/// The operation stream of one client thread (`CoreWorkload.doTransaction`).
pub struct Operations {
    workload: Arc<Workload>,
    choice: Discrete<Op>,
    keys: KeyChooser,
    inserts: Arc<AcknowledgedCounter>,
}

impl Operations {
    /// `inserts` is shared by every thread: it starts at `recordcount` in the run
    /// phase (the loaded records are 0..recordcount).
    pub fn new(workload: Arc<Workload>, inserts: Arc<AcknowledgedCounter>) -> anyhow::Result<Self> {
        let choice = Discrete::new(vec![
            (workload.readproportion, Op::Read),
            (workload.updateproportion, Op::Update),
            (workload.insertproportion, Op::Insert),
            (workload.scanproportion, Op::Scan),
            (workload.readmodifywriteproportion, Op::ReadModifyWrite),
        ]);
        anyhow::ensure!(!choice.is_empty(), "every operation proportion is 0");
        let insert_count = workload.records_to_load();
        anyhow::ensure!(insert_count > 0, "recordcount is 0: nothing to read");
        let start = workload.insertstart;
        let keys = match workload.requestdistribution {
            Distribution::Uniform => KeyChooser::Uniform {
                low: start,
                high: start + insert_count - 1,
            },
            Distribution::Zipfian => {
                // YCSB leaves room for the keys this run will insert.
                let new_keys =
                    (workload.operationcount as f64 * workload.insertproportion * 2.0) as u64;
                KeyChooser::Zipfian(ScrambledZipfian::new(
                    start as i64,
                    (start + insert_count + new_keys) as i64,
                ))
            }
            Distribution::Latest => KeyChooser::Latest(SkewedLatest::new(inserts.last() as i64)),
        };
        Ok(Operations {
            workload,
            choice,
            keys,
            inserts,
        })
    }

    fn keynum(&mut self, rng: &mut SmallRng) -> u64 {
        let last = self.inserts.last();
        match &mut self.keys {
            KeyChooser::Uniform { low, high } => rng.gen_range(*low..=*high),
            KeyChooser::Zipfian(gen) => loop {
                let k = gen.next(rng);
                if k >= 0 && k as u64 <= last {
                    return k as u64;
                }
            },
            KeyChooser::Latest(gen) => {
                let u: f64 = rng.gen();
                gen.next_with(last as i64, u).max(0) as u64
            }
        }
    }

    fn next_key(&mut self, rng: &mut SmallRng) -> String {
        let keynum = self.keynum(rng);
        self.workload.key(keynum)
    }

    fn update_fields(&self, rng: &mut SmallRng) -> Vec<u32> {
        if self.workload.writeallfields {
            self.workload.all_fields()
        } else {
            vec![rng.gen_range(0..self.workload.fieldcount)]
        }
    }

    pub fn next(&mut self, rng: &mut SmallRng) -> Step {
        let op = self.choice.next_with(rng.gen()).unwrap_or(Op::Read);
        match op {
            Op::Read => Step::Read {
                key: self.next_key(rng),
            },
            Op::Update => {
                let key = self.next_key(rng);
                Step::Update {
                    key,
                    fields: self.update_fields(rng),
                }
            }
            Op::Insert => {
                let keynum = self.inserts.next();
                Step::Insert {
                    keynum,
                    key: self.workload.key(keynum),
                }
            }
            Op::Scan => {
                let start = self.next_key(rng);
                let (min, max) = (self.workload.minscanlength, self.workload.maxscanlength);
                Step::Scan {
                    start,
                    count: rng.gen_range(min..=max.max(min)),
                }
            }
            Op::ReadModifyWrite => {
                let key = self.next_key(rng);
                Step::ReadModifyWrite {
                    key,
                    fields: self.update_fields(rng),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn presets_follow_ycsb_workload_files() {
        let a = Workload::preset("a").unwrap();
        assert_eq!((a.readproportion, a.updateproportion), (0.5, 0.5));
        assert_eq!(a.requestdistribution, Distribution::Zipfian);
        assert_eq!((a.fieldcount, a.fieldlength), (10, 100));
        let d = Workload::preset("D").unwrap();
        assert_eq!(d.requestdistribution, Distribution::Latest);
        assert_eq!(d.insertproportion, 0.05);
        let e = Workload::preset("e").unwrap();
        assert_eq!((e.scanproportion, e.maxscanlength), (0.95, 100));
        let f = Workload::preset("f").unwrap();
        assert_eq!(f.readmodifywriteproportion, 0.5);
        assert!(Workload::preset("g").is_err());
    }

    #[test]
    fn properties_override_and_bad_ones_are_named() {
        let mut w = Workload::preset("a").unwrap();
        w.set("requestdistribution", "uniform").unwrap();
        w.set("recordcount", "100000").unwrap();
        assert_eq!(w.requestdistribution, Distribution::Uniform);
        assert_eq!(w.records_to_load(), 100_000);
        let error = w.set("readproportion", "1.5").unwrap_err();
        assert!(error.to_string().contains("readproportion"), "{error}");
        assert!(w.set("nosuch", "1").is_err());
    }

    #[test]
    fn operation_mix_and_keys_follow_the_workload() {
        let mut w = Workload::preset("a").unwrap();
        w.recordcount = 1000;
        let w = Arc::new(w);
        let inserts = Arc::new(AcknowledgedCounter::new(w.recordcount));
        let mut ops = Operations::new(w.clone(), inserts).unwrap();
        let mut rng = SmallRng::seed_from_u64(1);
        let loaded: std::collections::HashSet<String> = (0..1000).map(|k| w.key(k)).collect();
        let (mut reads, mut updates) = (0, 0);
        for _ in 0..10_000 {
            match ops.next(&mut rng) {
                Step::Read { key } => {
                    reads += 1;
                    assert!(loaded.contains(&key));
                }
                Step::Update { key, fields } => {
                    updates += 1;
                    assert!(loaded.contains(&key));
                    assert_eq!(fields.len(), 1, "writeallfields=false updates one field");
                }
                other => panic!("workload a does {other:?}"),
            }
        }
        assert!((4500..5500).contains(&reads) && reads + updates == 10_000);
    }

    #[test]
    fn inserts_extend_the_key_space_readers_see_only_acknowledged_ones() {
        let w = Arc::new(Workload::preset("d").unwrap());
        let inserts = Arc::new(AcknowledgedCounter::new(w.recordcount));
        let mut ops = Operations::new(w.clone(), inserts.clone()).unwrap();
        let mut rng = SmallRng::seed_from_u64(2);
        let mut inserted = Vec::new();
        let keynum_of: std::collections::HashMap<String, u64> =
            (0..3000).map(|k| (w.key(k), k)).collect();
        for _ in 0..2000 {
            match ops.next(&mut rng) {
                Step::Insert { keynum, key } => {
                    assert_eq!(key, w.key(keynum));
                    inserted.push(keynum);
                }
                Step::Read { key } => {
                    let keynum = keynum_of[&key];
                    assert!(keynum <= inserts.last(), "read of an unacknowledged key");
                }
                other => panic!("workload d does {other:?}"),
            }
            if let Some(k) = inserted.pop() {
                inserts.acknowledge(k);
            }
        }
        assert!(inserts.last() > 1000, "inserts advanced the counter");
    }

    #[test]
    fn records_have_every_field_at_its_length() {
        let w = Workload::preset("a").unwrap();
        let mut rng = SmallRng::seed_from_u64(3);
        let record = w.record(&mut rng, &w.all_fields());
        let fields: Vec<&[u8]> = record.split(|b| *b == 0x1f).collect();
        assert_eq!(fields.len(), 10);
        assert!(fields.iter().all(|f| f.len() == "field0=".len() + 100));
        let bytes: Vec<u8> = fields.iter().flat_map(|f| f[7..].to_vec()).collect();
        assert!(
            bytes.iter().all(|b| (b' '..=b'?').contains(b)),
            "YCSB's alphabet"
        );
        let distinct: std::collections::BTreeSet<u8> = bytes.iter().copied().collect();
        assert_eq!(
            distinct.len(),
            32,
            "all 32 characters appear in 1,000 bytes"
        );
        assert_ne!(
            w.record(&mut rng, &w.all_fields()),
            record,
            "records differ"
        );
    }
}
