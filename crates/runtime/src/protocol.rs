//! The application protocol: one JSON object per line each way. The agent
//! learns who is asking from the socket's peer credentials, never from the
//! message, so no field here names a process.

/// Bumped when a request or reply changes incompatibly.
pub const PROTOCOL_VERSION: u32 = 1;

/// How a critical variable is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VariableMode {
    /// Must never change after registration: a change is an alert (heal-able).
    Guarded,
    /// Changes legitimately: copied periodically with a history of snapshots.
    Mirrored,
}

/// A request from an application.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum AppRequest {
    /// First message of a connection: the protocol version and the
    /// addresses of the safe-point mailbox in the application's memory.
    Hello {
        version: u32,
        pending_address: u64,
        parked_address: u64,
        passed_address: u64,
    },
    Ping,
    RegisterVariable {
        name: String,
        address: u64,
        size: u64,
        mode: VariableMode,
    },
    RequestRollback {
        reason: String,
    },
}

/// The agent's answer to one request.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AppReply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// For a rollback: the patch rolled back and the pause.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_us: Option<u64>,
}

impl AppReply {
    pub fn ok() -> Self {
        AppReply {
            ok: true,
            ..Default::default()
        }
    }

    pub fn error(message: impl Into<String>) -> Self {
        AppReply {
            ok: false,
            error: Some(message.into()),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_the_documented_wire_form() {
        let request = AppRequest::RegisterVariable {
            name: "config".into(),
            address: 4096,
            size: 64,
            mode: VariableMode::Guarded,
        };
        assert_eq!(
            serde_json::to_string(&request).unwrap(),
            r#"{"op":"register_variable","name":"config","address":4096,"size":64,"mode":"guarded"}"#
        );
        let parsed: AppRequest = serde_json::from_str(r#"{"op":"request_rollback","reason":"bad"}"#).unwrap();
        assert_eq!(parsed, AppRequest::RequestRollback { reason: "bad".into() });
        assert!(serde_json::from_str::<AppRequest>(r#"{"op":"format_disk"}"#).is_err());
        assert_eq!(serde_json::to_string(&AppReply::ok()).unwrap(), r#"{"ok":true}"#);
    }
}
