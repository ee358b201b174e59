//! Dead and dense units: SAE latents that never fire on the probe set, or fire nearly
//! everywhere, say nothing a description could name, so stages 1-3 skip them (by default)
//! and the results record why.
//!
//! The probe stage counts, per unit and image, the share of the map's positions where the
//! unit is above 0; [`Firing`] sums those over images (and over probe slices, by
//! [`Firing::merge`]). A unit is `dead` when it fired on no image, `dense` when it fired on
//! at least `dense_share` of all positions of all images.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::CoreError;

/// A unit's liveness on the probe set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnitStatus {
    Active,
    /// Above 0 at no position of any probe image.
    Dead,
    /// Above 0 at `dense_share` of all positions or more.
    Dense,
}

impl UnitStatus {
    pub const fn as_str(self) -> &'static str {
        match self {
            UnitStatus::Active => "active",
            UnitStatus::Dead => "dead",
            UnitStatus::Dense => "dense",
        }
    }
}

impl fmt::Display for UnitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `[units]`: which SAE latents stages 1-3 skip. Channels and directions are never
/// classified (their values are signed; "above 0" says nothing about them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Liveness {
    /// A latent above 0 at this share of all probe positions or more is `dense`.
    pub dense_share: f64,
    /// Statuses whose latents get no description (only their status): `dead`, `dense`.
    pub skip: Vec<UnitStatus>,
}

impl Default for Liveness {
    fn default() -> Self {
        Self { dense_share: 0.9, skip: vec![UnitStatus::Dead, UnitStatus::Dense] }
    }
}

impl Liveness {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    pub fn validate(&self) -> Result<(), CoreError> {
        if !(self.dense_share > 0.0 && self.dense_share <= 1.0) {
            return Err(CoreError::invalid(
                "units.dense_share",
                "must be a share in (0, 1], e.g. 0.9 for latents above 0 at 90% of positions",
            ));
        }
        if self.skip.contains(&UnitStatus::Active) {
            return Err(CoreError::invalid(
                "units.skip",
                "lists the statuses to skip: dead, dense (skipping `active` would skip everything)",
            ));
        }
        Ok(())
    }

    /// The status of a unit from its counts over `images` probe images.
    pub fn status(&self, images: u64, fired_images: u64, position_share_sum: f64) -> UnitStatus {
        if images == 0 {
            UnitStatus::Active
        } else if fired_images == 0 {
            UnitStatus::Dead
        } else if position_share_sum / images as f64 >= self.dense_share {
            UnitStatus::Dense
        } else {
            UnitStatus::Active
        }
    }

    pub fn skips(&self, status: UnitStatus) -> bool {
        self.skip.contains(&status)
    }
}

/// How often each unit of a layer fired, summed over images.
#[derive(Debug, Clone, PartialEq)]
pub struct Firing {
    pub images: u64,
    /// Per unit: images on which it was above 0 somewhere.
    pub fired_images: Vec<u64>,
    /// Per unit: the sum over images of the share of positions where it was above 0.
    pub position_share: Vec<f64>,
}

impl Firing {
    pub fn new(units: usize) -> Self {
        Self { images: 0, fired_images: vec![0; units], position_share: vec![0.0; units] }
    }

    pub fn units(&self) -> usize {
        self.fired_images.len()
    }

    /// Adds images given as rows of per-unit position shares (`images x units`, row-major).
    pub fn push_shares(&mut self, shares: &[f32]) {
        let units = self.units();
        assert!(units > 0 && shares.len().is_multiple_of(units), "shares are not whole rows");
        for row in shares.chunks_exact(units) {
            self.images += 1;
            for (u, &s) in row.iter().enumerate() {
                if s > 0.0 {
                    self.fired_images[u] += 1;
                    self.position_share[u] += f64::from(s);
                }
            }
        }
    }

    pub fn merge(&mut self, other: &Firing) {
        assert_eq!(self.units(), other.units(), "merging firing counts of different layers");
        self.images += other.images;
        for (a, b) in self.fired_images.iter_mut().zip(&other.fired_images) {
            *a += b;
        }
        for (a, b) in self.position_share.iter_mut().zip(&other.position_share) {
            *a += b;
        }
    }

    /// Unit `u`'s share of all positions of all images where it was above 0.
    pub fn rate(&self, u: usize) -> f64 {
        if self.images == 0 { 0.0 } else { self.position_share[u] / self.images as f64 }
    }

    pub fn status(&self, u: usize, liveness: &Liveness) -> UnitStatus {
        liveness.status(self.images, self.fired_images[u], self.position_share[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_dense_and_active_from_counts() {
        let mut firing = Firing::new(3);
        // Unit 0 never fires; unit 1 fires everywhere; unit 2 on a quarter of one image.
        firing.push_shares(&[0.0, 1.0, 0.25, 0.0, 1.0, 0.0]);
        let mut more = Firing::new(3);
        more.push_shares(&[0.0, 0.8, 0.0]);
        firing.merge(&more);
        assert_eq!(firing.images, 3);
        assert_eq!(firing.fired_images, vec![0, 3, 1]);
        let live = Liveness::default();
        assert_eq!(firing.status(0, &live), UnitStatus::Dead);
        assert_eq!(firing.status(1, &live), UnitStatus::Dense, "rate {}", firing.rate(1));
        assert_eq!(firing.status(2, &live), UnitStatus::Active);
        let strict = Liveness { dense_share: 0.95, ..Liveness::default() };
        assert_eq!(firing.status(1, &strict), UnitStatus::Active, "2.8 / 3 < 0.95");
        assert_eq!(Firing::new(2).status(0, &live), UnitStatus::Active, "no images, no verdict");
    }

    #[test]
    fn settings_are_checked() {
        assert!(Liveness::default().validate().is_ok());
        assert!(Liveness { dense_share: 0.0, ..Liveness::default() }.validate().is_err());
        let all = Liveness { skip: vec![UnitStatus::Active], ..Liveness::default() };
        assert!(all.validate().unwrap_err().to_string().contains("units.skip"));
        assert!(Liveness::default().skips(UnitStatus::Dead));
        assert!(!Liveness::default().skips(UnitStatus::Active));
    }
}
