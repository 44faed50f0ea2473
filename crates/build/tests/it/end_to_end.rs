//! The whole path on a running, stripped program: build against its PID,
//! apply, see the new behaviour, roll back.
