//! `hangar images ls|build|import|bootstrap`.

use std::process::ExitCode;

use clap::Subcommand;

use crate::client::Client;

#[derive(Subcommand)]
pub enum ImagesCmd {}

pub async fn run(_client: &Client, cmd: ImagesCmd) -> anyhow::Result<ExitCode> {
    match cmd {}
}
