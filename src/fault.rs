//! Faults: damage or a broken rule found in a pool, as values. A fault says what is wrong and
//! where (slot, page, layer, virtual block, pool block), so `check`, a writable open and the
//! self-check can decide what it means without reading its wording, and `check --json` gives
//! scripts the location as fields.

use crate::format::{LayerId, PBlock, VBlock};
use serde::{Deserialize, Serialize};
use std::fmt;

/// What is wrong.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum What {
    /// A superblock slot does not verify: torn by a crash during a commit, or damaged.
    BadSlot {
        reason: String,
        other_slot_good: bool,
    },
    /// The last commit of the log's tail was left out: its pages are on disk but not all of
    /// its data (power lost during its sync; it was never acknowledged).
    CutOffCommit {
        commit: u64,
    },
    /// Nothing in the file loads as a pool.
    Unloadable {
        reason: String,
    },
    /// The newest generation failed to load, so an older one is in use.
    Fallback {
        generation: u64,
        why: String,
    },
    /// The state in use has fewer log pages than a newer superblock names for the same log:
    /// damage, not a crash, cut the log short, and the commits past it are lost.
    LogCutShort {
        generation: u64,
        named: u64,
        read: u64,
    },
    /// A pool block is referenced twice.
    UsedTwice {
        other: String,
    },
    /// A pool block lies in the superblock area or past the end of the pool file.
    OutsideDataArea {
        first: u64,
        file_blocks: u64,
    },
    /// A layer maps a block past its own end.
    MappedPastEnd {
        disk_size: u64,
    },
    /// A layer's stored counters disagree with its map.
    Counters {
        stored_data: u64,
        stored_zero: u64,
        data: u64,
        zero: u64,
    },
    WritableParent {
        parent: String,
    },
    SmallerThanParent {
        parent: String,
    },
    MissingParent {
        parent: LayerId,
    },
    /// A layer's parent does not list it among its children.
    ChildNotListed {
        parent: String,
    },
    /// A layer lists a child whose parent it is not.
    NotAChild {
        child: LayerId,
    },
    /// A layer id is not below the catalogue's next id.
    IdNotBelowNext {
        next: LayerId,
    },
    /// The allocator holds a block that nothing references.
    Leaked,
    /// A referenced block is free in the allocator.
    FreeButReferenced {
        by: String,
    },
    /// A block of the open transaction is free in the allocator.
    FreshButFree,
    /// The allocator's count disagrees with its bitmap.
    UsedCount {
        counted: u64,
        bitmap: u64,
    },
    /// A data block's content does not match its checksum.
    Checksum {
        stored: u32,
        computed: u32,
    },
    /// A checksum page of the checkpoint does not verify or cannot be read: the crcs of the
    /// blocks its runs name are lost (reads of them fail).
    ChecksumPage {
        reason: String,
    },
}

impl What {
    /// A layer's counters (`stored`: data and zero blocks) that disagree with what its map,
    /// or the part of it looked at, was `counted` to hold; None if they agree.
    pub fn counters(stored: (u64, u64), counted: (u64, u64)) -> Option<What> {
        (stored != counted).then_some(What::Counters {
            stored_data: stored.0,
            stored_zero: stored.1,
            data: counted.0,
            zero: counted.1,
        })
    }
}

/// A layer as a fault names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRef {
    pub id: LayerId,
    pub name: String,
}

impl fmt::Display for LayerRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "layer {:?} ({})", self.name, self.id)
    }
}

/// Where it is; every field that applies is set.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Where {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slot: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer: Option<LayerRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vblock: Option<VBlock>,
    /// Byte offset of `vblock` in the layer's disk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pblock: Option<PBlock>,
    /// What holds `pblock` when it is not a layer (the checkpoint, the log...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    #[serde(flatten)]
    pub what: What,
    pub at: Where,
    /// The same as `Display`, for readers of `--json`.
    pub message: String,
}

impl Fault {
    pub fn new(what: What, at: Where) -> Fault {
        let message = describe(&what, &at);
        Fault { what, at, message }
    }

    /// Only a warning: the state in use is whole and the next writable open repairs it.
    pub fn is_warning(&self) -> bool {
        matches!(
            self.what,
            What::BadSlot {
                other_slot_good: true,
                ..
            } | What::CutOffCommit { .. }
        )
    }
}

impl Where {
    pub fn layer(id: LayerId, name: &str) -> Where {
        Where {
            layer: Some(LayerRef {
                id,
                name: name.to_string(),
            }),
            ..Default::default()
        }
    }

    pub fn block(mut self, vb: VBlock, block_size: u32) -> Where {
        self.vblock = Some(vb);
        self.offset = Some(vb.0.saturating_mul(block_size as u64));
        self
    }

    pub fn pblock(mut self, p: PBlock) -> Where {
        self.pblock = Some(p);
        self
    }

    pub fn holder(p: PBlock, holder: &str) -> Where {
        Where {
            pblock: Some(p),
            holder: Some(holder.to_string()),
            ..Default::default()
        }
    }

    /// Who holds the place: a layer's block, or a named holder.
    pub fn who(&self) -> String {
        match (&self.layer, self.vblock, &self.holder) {
            (Some(l), Some(vb), _) => format!("{l} {vb}"),
            (Some(l), None, _) => l.to_string(),
            (None, _, Some(h)) => h.clone(),
            (None, _, None) => "the pool".into(),
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

fn describe(what: &What, at: &Where) -> String {
    let layer = at
        .layer
        .as_ref()
        .map_or_else(|| "a layer".to_string(), |l| l.to_string());
    let pb = at.pblock.map_or_else(String::new, |p| p.to_string());
    let vb = at.vblock.map_or_else(String::new, |v| v.to_string());
    let offset = at.offset.unwrap_or(0);
    match what {
        What::BadSlot {
            reason,
            other_slot_good: true,
        } => format!("{reason} (torn by a crash during a commit, or damaged); the other slot is in use and the next writable open rewrites this one"),
        What::BadSlot { reason, .. } => {
            format!("{reason} (torn by a crash during a commit, or damaged)")
        }
        What::CutOffCommit { commit } => format!(
            "commit {commit}, the last in the log, was left out: a crash during its sync kept its log pages but not all of its data (it was never acknowledged)"
        ),
        What::Unloadable { reason } => reason.clone(),
        What::ChecksumPage { reason } => reason.clone(),
        What::Fallback { generation, why } => format!(
            "using superblock generation {generation} because newer state failed to load: {why}"
        ),
        What::LogCutShort {
            generation,
            named,
            read,
        } => format!(
            "superblock generation {generation} names {named} log pages, but only {read} can be read: the commits after log page {read} are lost (export what is readable from a read-only open)"
        ),
        What::UsedTwice { other } => {
            format!("{pb} is used by {other} and by {}", at.who())
        }
        What::OutsideDataArea { first, file_blocks } if at.layer.is_some() => format!(
            "{layer}: {vb} (byte offset {offset}) maps {pb}, outside the pool's data area ({first}..{file_blocks}), past the end of the pool file or in its superblock area"
        ),
        What::OutsideDataArea { first, file_blocks } => format!(
            "{}: {pb} is outside the pool's data area ({first}..{file_blocks})",
            at.who()
        ),
        What::MappedPastEnd { disk_size } => {
            format!("{layer}: {vb} is mapped past the layer's end ({disk_size} bytes)")
        }
        What::Counters {
            stored_data,
            stored_zero,
            data,
            zero,
        } => format!(
            "{layer}: stored counters say {stored_data} data and {stored_zero} zero blocks, its map holds {data} and {zero}"
        ),
        What::WritableParent { parent } => format!("{layer} has a writable parent {parent}"),
        What::SmallerThanParent { parent } => {
            format!("{layer} is smaller than its parent {parent}")
        }
        What::MissingParent { parent } => format!("{layer}: parent {parent} is missing"),
        What::ChildNotListed { parent } => format!("{parent} does not list child {layer}"),
        What::NotAChild { child } => {
            format!("{layer} lists {child} as a child, which it is not")
        }
        What::IdNotBelowNext { next } => format!("{layer} is not below the next id {next}"),
        What::Leaked => format!("{pb} is allocated but nothing references it (leaked)"),
        What::FreeButReferenced { by } => {
            format!("{pb}, used by {by}, is free in the allocator")
        }
        What::FreshButFree => format!("{pb} is fresh but free"),
        What::UsedCount { counted, bitmap } => {
            format!("allocator counts {counted} used blocks, its bitmap has {bitmap}")
        }
        What::Checksum { stored, computed } => format!(
            "{layer}: data block {} (byte offset {offset}) at {pb} fails its checksum (stored {stored:#010x}, computed {computed:#010x})",
            at.vblock.map_or(0, |v| v.0)
        ),
    }
}
