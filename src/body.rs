//! Reading an HTTP answer's body with a bound: an agent, a tool, a model provider or a collector
//! answering without end (or with far more than anyone could use) costs at most the bound in
//! memory, and the rest is never read.

/// Reads at most `limit` bytes of `resp`'s body: the bytes, and whether there was more (left
/// unread; the connection is dropped with the response).
pub async fn read_at_most(
    mut resp: reqwest::Response,
    limit: usize,
) -> Result<(Vec<u8>, bool), reqwest::Error> {
    let mut body = Vec::with_capacity(
        resp.content_length()
            .map_or(0, |n| n.min(limit as u64) as usize),
    );
    while let Some(chunk) = resp.chunk().await? {
        if body.len() + chunk.len() > limit {
            body.extend_from_slice(&chunk[..limit - body.len()]);
            return Ok((body, true));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body, false))
}

/// The longest prefix of `bytes`, at most `max` long, that is whole UTF-8 text.
pub fn utf8_prefix(bytes: &[u8], max: usize) -> &str {
    let end = bytes.len().min(max);
    match std::str::from_utf8(&bytes[..end]) {
        Ok(s) => s,
        // Cut inside a character (or invalid bytes): up to the last whole one.
        Err(e) => std::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_never_cuts_a_character() {
        assert_eq!(utf8_prefix("héllo".as_bytes(), 2), "h");
        assert_eq!(utf8_prefix("héllo".as_bytes(), 3), "hé");
        assert_eq!(utf8_prefix(b"abc", 10), "abc");
        assert_eq!(utf8_prefix(&[0xff, b'a'], 2), "");
    }
}
