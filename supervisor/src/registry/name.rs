//! Function names: the only guest-controlled string that becomes part of a path, so it is
//! validated before anything touches the filesystem.

use std::fmt;

/// Longest function name.
pub const MAX_NAME_LEN: usize = 64;

/// A validated function name: `[A-Za-z0-9][A-Za-z0-9._-]{0,63}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FunctionName(String);

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("function name is empty")]
    Empty,
    #[error("function name is longer than {MAX_NAME_LEN} characters")]
    TooLong,
    #[error("function name must start with a letter or digit")]
    BadStart,
    #[error("function name may only contain letters, digits, '.', '_' and '-'")]
    BadCharacter,
}

impl FunctionName {
    pub fn parse(raw: &str) -> Result<Self, NameError> {
        let bytes = raw.as_bytes();
        let first = *bytes.first().ok_or(NameError::Empty)?;
        if bytes.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong);
        }
        if !first.is_ascii_alphanumeric() {
            return Err(NameError::BadStart);
        }
        if !bytes.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
            return Err(NameError::BadCharacter);
        }
        Ok(FunctionName(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for FunctionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_alphabet() {
        for ok in ["hello", "a", "A1.b_c-d", "0", &"x".repeat(64), "a..b"] {
            assert!(FunctionName::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn refuses_everything_that_could_reach_another_path() {
        let cases: &[(&str, NameError)] = &[
            ("", NameError::Empty),
            ("..", NameError::BadStart),
            (".hidden", NameError::BadStart),
            ("-x", NameError::BadStart),
            ("/etc/passwd", NameError::BadStart),
            ("a/b", NameError::BadCharacter),
            ("a\\b", NameError::BadCharacter),
            ("a\0b", NameError::BadCharacter),
            ("a%2Fb", NameError::BadCharacter),
            ("a b", NameError::BadCharacter),
            ("héllo", NameError::BadCharacter),
        ];
        for (raw, want) in cases {
            assert_eq!(FunctionName::parse(raw).unwrap_err(), *want, "{raw:?}");
        }
        assert_eq!(FunctionName::parse(&"x".repeat(65)).unwrap_err(), NameError::TooLong);
    }
}
