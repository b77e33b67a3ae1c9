//! The sandboxed minijinja environment a chat template runs in.
//!
//! It mirrors what HuggingFace `transformers` gives a template (`trim_blocks`, `lstrip_blocks`,
//! python string and dict methods, `raise_exception`, a `tojson` that writes like Python's
//! `json.dumps`) and nothing else: no loader (so `include`/`import` find only the template itself),
//! no file, clock or network access, and a fuel limit on every render.

use std::fmt::Write as _;

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind};

/// The name the template is registered under in its environment.
pub(crate) const TEMPLATE_NAME: &str = "chat_template";

/// Marks an error raised by the template's own `raise_exception(message)`.
#[derive(Debug)]
pub(crate) struct Raised(pub(crate) String);

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

pub(crate) fn environment(fuel: u64) -> Environment<'static> {
    let mut env = Environment::new();
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .unwrap_or_default();
    env.set_syntax(syntax);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.set_fuel(Some(fuel));
    env.add_function("raise_exception", raise_exception);
    env.add_filter("tojson", tojson);
    env
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message.clone()).with_source(Raised(message)))
}

/// `value | tojson(indent=None, ensure_ascii=False, sort_keys=False, separators=None)`, written the
/// way Python's `json.dumps` writes it (`", "` and `": "` separators), which is what templates
/// written for `transformers` expect. Unlike minijinja's own filter, it does not HTML-escape.
fn tojson(value: &Value, indent: Option<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let indent = match kwargs.get::<Option<Value>>("indent")?.or(indent) {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => Some(match v.as_str() {
            Some(s) => s.to_owned(),
            None => " ".repeat(usize::try_from(v).unwrap_or(0).min(64)),
        }),
    };
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let separators = kwargs.get::<Option<Vec<String>>>("separators")?;
    kwargs.assert_all_used()?;
    let (item_sep, key_sep) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be two strings",
            ));
        }
        None if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        None => (", ".to_owned(), ": ".to_owned()),
    };
    let json = serde_json::to_value(value).map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let writer = PyJson {
        indent: indent.as_deref(),
        item_sep: &item_sep,
        key_sep: &key_sep,
        ensure_ascii,
        sort_keys,
    };
    let mut out = String::new();
    writer.write(&mut out, &json, 0);
    Ok(Value::from(out))
}

struct PyJson<'a> {
    indent: Option<&'a str>,
    item_sep: &'a str,
    key_sep: &'a str,
    ensure_ascii: bool,
    sort_keys: bool,
}

impl PyJson<'_> {
    fn write(&self, out: &mut String, value: &serde_json::Value, level: usize) {
        use serde_json::Value as J;
        match value {
            J::Null => out.push_str("null"),
            J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            J::Number(n) => {
                let _ = write!(out, "{n}");
            }
            J::String(s) => self.write_str(out, s),
            J::Array(items) if items.is_empty() => out.push_str("[]"),
            J::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    self.separate(out, i, level + 1);
                    self.write(out, item, level + 1);
                }
                self.newline(out, level);
                out.push(']');
            }
            J::Object(map) if map.is_empty() => out.push_str("{}"),
            J::Object(map) => {
                let mut entries: Vec<_> = map.iter().collect();
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                }
                out.push('{');
                for (i, (key, item)) in entries.into_iter().enumerate() {
                    self.separate(out, i, level + 1);
                    self.write_str(out, key);
                    out.push_str(self.key_sep);
                    self.write(out, item, level + 1);
                }
                self.newline(out, level);
                out.push('}');
            }
        }
    }

    fn separate(&self, out: &mut String, index: usize, level: usize) {
        if index > 0 {
            out.push_str(self.item_sep);
        }
        self.newline(out, level);
    }

    fn newline(&self, out: &mut String, level: usize) {
        if let Some(indent) = self.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(indent);
            }
        }
    }

    fn write_str(&self, out: &mut String, s: &str) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && !c.is_ascii()) => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        let _ = write!(out, "\\u{unit:04x}");
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// An `io::Write` into a `Vec` that refuses to grow past `limit` bytes.
pub(crate) struct LimitedWriter {
    pub(crate) buf: Vec<u8>,
    pub(crate) limit: usize,
    pub(crate) exceeded: bool,
}

impl std::io::Write for &mut LimitedWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len().saturating_add(data.len()) > self.limit {
            self.exceeded = true;
            return Err(std::io::Error::other("output limit exceeded"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use minijinja::context;
    use minijinja::value::Serde;

    fn render(source: &str, ctx: Value) -> String {
        let env = environment(100_000);
        env.render_str(source, ctx).unwrap()
    }

    #[test]
    fn tojson_writes_like_python() {
        let tool = serde_json::json!({"name": "f", "d": "a<b> & 'c' é", "p": [1, 2.5, null, true], "e": {}});
        let ctx = context! { tool => Value::from(Serde(&tool)) };
        // Python: json.dumps(tool, ensure_ascii=False) keeps insertion order; serde_json sorts keys
        // without preserve_order, so compare with sort_keys on.
        assert_eq!(
            render("{{ tool | tojson(sort_keys=true) }}", ctx.clone()),
            r#"{"d": "a<b> & 'c' é", "e": {}, "name": "f", "p": [1, 2.5, null, true]}"#
        );
        assert_eq!(
            render("{{ tool.p | tojson(indent=2) }}", ctx.clone()),
            "[\n  1,\n  2.5,\n  null,\n  true\n]"
        );
        assert_eq!(render("{{ 'é\n' | tojson(ensure_ascii=true) }}", ctx), r#""\u00e9\n""#);
    }

    #[test]
    fn python_methods_and_escapes() {
        let out = render(
            "{{ 'a</think>b'.split('</think>')[-1] }}|{{ ' x '.strip() }}|{{ 'ab'.startswith('a') }}|{{ '\\n' }}",
            context! {},
        );
        assert_eq!(out, "b|x|True|\n");
    }
}
