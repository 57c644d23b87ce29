//! Sans-IO SMTP protocol core.
//!
//! Nothing here performs I/O, spawns tasks or reads clocks: bytes go in, replies and events come
//! out. The server and the delivery agent drive it with sockets; tests drive it with byte
//! slices.

pub mod base64;
pub mod client;
pub mod codec;
pub mod parse;
pub mod reply;
pub mod session;
pub mod trace;
pub mod types;

pub use client::{
    AfterTransaction, ClientConfig, ClientError, ClientSession, Credentials, Envelope,
    EnvelopeRecipient, Extensions, FramedContent, InvalidCredentials, RecipientResult, Refusal,
    ReplyError, ReplyParser, ServerReply, SessionStep, TlsIntent, Transaction as ClientTransaction,
    TransactionOutcome, TransactionStep, is_seven_bit,
};
pub use parse::parse_command;
pub use reply::{EnhancedStatus, Reply};
pub use session::{
    AuthRequest, AuthWithoutTls, Event, ServerSession, SessionConfig, Transaction,
    is_plaintext_mechanism,
};
pub use types::*;
