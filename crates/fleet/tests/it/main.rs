//! Integration tests of the fleet prediction service: real
//! `shadowpatch-predictor` processes on 127.0.0.1 ephemeral ports, over
//! SQLite files and a real PostgreSQL started by the test.

mod postgres;
mod sqlite;
mod support;
