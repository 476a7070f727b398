//! Writing HTML by hand, safely: escaping, and the status chip every page
//! and chart uses.

/// HTML-escape text for element content and quoted attributes.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A status word as a coloured chip; the word itself carries the meaning
/// (colour is never the only cue).
pub fn chip(word: &str) -> String {
    let class = match word {
        "connected" | "healthy" | "running" | "succeeded" | "ok" | "passed" => "good",
        "disconnected" | "unhealthy" | "failed" | "rolled_back" | "aborted" | "denied"
        | "error" | "lost" => "bad",
        "installing" | "staged" | "staging" | "starting" | "stopping" | "pending"
        | "awaiting_approval" | "paused" | "rolling_back" | "updating" | "inconclusive"
        | "health_only" => "busy",
        _ => "plain",
    };
    format!(r#"<span class="chip {class}">{}</span>"#, esc(word))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped() {
        assert_eq!(
            esc(r#"<a href="x">&'"#),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        assert!(chip("<b>").contains("&lt;b&gt;"));
    }
}
