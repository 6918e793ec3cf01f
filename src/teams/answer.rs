//! Reading what Microsoft answered. Answers are data, not orders: every body
//! is read up to a size limit within the request's time limit, and a
//! `Retry-After` is parsed in both of its forms and clamped.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::HeaderMap;
use http::header::RETRY_AFTER;
use http_body_util::BodyExt;
use serde::Deserialize;

use super::TeamsError;
use super::connector::Answer;

/// The most of an answer's body herald reads. Microsoft's answers are a few
/// hundred bytes; anything larger is cut here.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Why a body could not be read in full.
#[derive(Debug)]
pub enum BodyError {
    TooLarge,
    Transport(String),
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::TooLarge => write!(f, "the answer's body exceeds {MAX_BODY_BYTES} bytes"),
            BodyError::Transport(err) => f.write_str(err),
        }
    }
}

/// A body, up to `MAX_BODY_BYTES` (the caller bounds the time).
pub async fn read_body<B>(mut body: B) -> Result<Vec<u8>, BodyError>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::error::Error + 'static,
{
    let mut read = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|err| BodyError::Transport(crate::text::error_chain(&err)))?;
        if let Ok(chunk) = frame.into_data() {
            if read.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(BodyError::TooLarge);
            }
            read.extend_from_slice(&chunk);
        }
    }
    Ok(read)
}

/// `Retry-After` as delta-seconds or an HTTP-date (RFC 9110 §10.2.3), as a
/// wait from `now`, at most `max`. A date in the past is no wait; anything
/// unreadable is ignored.
pub fn retry_after(value: &str, now: SystemTime, max: Duration) -> Option<Duration> {
    let value = value.trim();
    let wait = if value.bytes().all(|b| b.is_ascii_digit()) && !value.is_empty() {
        // A number too large for u64 is still "a long time".
        Duration::from_secs(value.parse::<u64>().unwrap_or(u64::MAX))
    } else {
        let at = httpdate::parse_http_date(value).ok()?;
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(wait.min(max))
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

pub fn correlation_id(headers: &HeaderMap) -> Option<String> {
    let value = headers.get("x-correlating-operationid")?.to_str().ok()?;
    Some(crate::text::clip(value, 128))
}

/// Microsoft's error answer, with its code, correlation id and `Retry-After`.
pub fn api_error(answer: Answer, max_retry_after: Duration) -> TeamsError {
    let status = answer.status.as_u16();
    let correlation_id = correlation_id(&answer.headers);
    let retry_after =
        answer.headers.get(RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(|v| retry_after(v, SystemTime::now(), max_retry_after));
    let text = match &answer.body {
        Ok(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        Err(err) => format!("<{err}>"),
    };
    let (code, message) = match serde_json::from_str::<ErrorBody>(&text) {
        Ok(body) => (body.error.code.map(|c| crate::text::clip(&c, 128)), body.error.message.unwrap_or_default()),
        Err(_) => (None, text),
    };
    TeamsError::Api { status, code, message: crate::text::clip(&message, 512), correlation_id, retry_after }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_secs(3600);

    #[test]
    fn retry_after_in_seconds_and_as_a_date() {
        let now = httpdate::parse_http_date("Sun, 22 Nov 2026 10:00:00 GMT").unwrap();
        assert_eq!(retry_after("7", now, MAX), Some(Duration::from_secs(7)));
        assert_eq!(retry_after(" 0 ", now, MAX), Some(Duration::ZERO));
        assert_eq!(retry_after("Sun, 22 Nov 2026 10:00:30 GMT", now, MAX), Some(Duration::from_secs(30)));
        assert_eq!(retry_after("Sun, 22 Nov 2026 09:00:00 GMT", now, MAX), Some(Duration::ZERO), "in the past");
    }

    #[test]
    fn absurd_retry_after_values_are_clamped_or_ignored() {
        let now = SystemTime::now();
        assert_eq!(retry_after("99999999999999999999999999", now, MAX), Some(MAX));
        assert_eq!(retry_after("18446744073709551615", now, MAX), Some(MAX));
        assert_eq!(retry_after("Fri, 31 Dec 9999 23:59:59 GMT", now, MAX), Some(MAX));
        assert_eq!(retry_after("-5", now, MAX), None);
        assert_eq!(retry_after("soon", now, MAX), None);
        assert_eq!(retry_after("", now, MAX), None);
        assert_eq!(retry_after("1.5", now, MAX), None);
    }
}
