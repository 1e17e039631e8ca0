//! An in-memory `Datapath`, so reconciliation can be tested without a kernel.
#![forbid(unsafe_code)]
use super::image::{MapImage, Op};
use super::{Datapath, DatapathError};

#[derive(Debug, Default)]
pub struct FakeDatapath {
    pub image: MapImage,
    /// Every op applied, in order.
    pub log: Vec<Op>,
    /// Fail the n-th op from now (0 = the next one), to test partial failures.
    pub fail_at: Option<usize>,
}

impl Datapath for FakeDatapath {
    fn apply(&mut self, op: &Op) -> Result<(), DatapathError> {
        if let Some(n) = self.fail_at.as_mut() {
            if *n == 0 {
                self.fail_at = None;
                return Err(DatapathError::Map { map: "fake", op: "insert", source: aya::maps::MapError::KeyNotFound });
            }
            *n -= 1;
        }
        self.image.apply(op);
        self.log.push(op.clone());
        Ok(())
    }

    fn read_image(&self) -> Result<MapImage, DatapathError> {
        Ok(self.image.clone())
    }
}
