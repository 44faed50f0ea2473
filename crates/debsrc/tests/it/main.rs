//! The Debian source crate's integration tests, as one test binary (see
//! docs/testing.md). They need dpkg-dev, network access to deb.debian.org
//! (or the machine's Debian mirror) and an installed memcached with its
//! build dependencies; `.ci/run` installs them. The source cache is
//! `$SHADOWPATCH_DEBSRC_CACHE`, default `target/tmp/debsrc-cache`, kept
//! between runs.

mod common;
mod fetch;
mod reference;
mod resolve;
