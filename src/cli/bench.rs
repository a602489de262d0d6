//! `tulu bench` (in progress).
/// Bench flags.
#[derive(clap::Args)]
pub struct BenchArgs {}
/// `tulu bench`.
pub fn bench(_a: &BenchArgs) -> tulu::Result<()> { Err(tulu::Error::Backend("not yet".into())) }
