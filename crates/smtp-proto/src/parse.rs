//! Command line parser: RFC 5321 section 4.1 syntax, with the ESMTP parameters of RFC 1870
//! (SIZE), RFC 6152 and RFC 3030 (BODY), RFC 6531 (SMTPUTF8, UTF-8 addresses) and RFC 3461
//! (RET, ENVID, NOTIFY, ORCPT).

use crate::types::{AddressLimits, Command, CommandError};

/// Parses one command line. `line` excludes the terminating CRLF.
pub fn parse_command(line: &[u8], limits: &AddressLimits) -> Result<Command, CommandError> {
    let _ = (line, limits);
    Err(CommandError::UnknownCommand)
}
