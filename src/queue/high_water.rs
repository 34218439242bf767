//! `high-water.json`: the highest qseq and per-rollout seq ever used,
//! written durably before retention removes anything (crash case 7), so a
//! pruned number never comes back.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::error::HighWaterError;
use super::{record, MAX_QSEQ};
use crate::ids::RolloutId;
use crate::wire::MAX_SEQ;

/// The highest numbers ever used, persisted before pruning (crash case 7).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct HighWater {
    pub(super) qseq: u64,
    pub(super) seqs: BTreeMap<RolloutId, u64>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct HighWaterOnDisk {
    format: u32,
    high_water: HighWater,
    checksum: String,
}

impl HighWater {
    pub(super) fn encode(&self) -> Vec<u8> {
        let checksum = record::sha256_tagged(&serde_json::to_vec(self).expect("high water serialises"));
        let on_disk = HighWaterOnDisk { format: record::RECORD_FORMAT, high_water: self.clone(), checksum };
        let mut bytes = serde_json::to_vec(&on_disk).expect("high water serialises");
        bytes.push(b'\n');
        bytes
    }

    pub(super) fn decode(bytes: &[u8]) -> Result<HighWater, HighWaterError> {
        let on_disk: HighWaterOnDisk =
            serde_json::from_slice(bytes).map_err(|e| HighWaterError::Json(e.to_string()))?;
        if on_disk.format != record::RECORD_FORMAT {
            return Err(HighWaterError::Format(on_disk.format));
        }
        let computed = record::sha256_tagged(&serde_json::to_vec(&on_disk.high_water).expect("high water serialises"));
        if computed != on_disk.checksum {
            return Err(HighWaterError::Checksum { stored: on_disk.checksum, computed });
        }
        let hw = on_disk.high_water;
        if hw.qseq > MAX_QSEQ {
            return Err(HighWaterError::QseqBeyondBound(hw.qseq));
        }
        if let Some((rollout_id, seq)) = hw.seqs.iter().find(|(_, seq)| **seq > MAX_SEQ) {
            return Err(HighWaterError::SeqBeyondBound { rollout_id: rollout_id.clone(), seq: *seq });
        }
        Ok(hw)
    }
}
