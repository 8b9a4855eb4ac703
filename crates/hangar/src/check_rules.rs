//! The rules of `hangar check` for OpenResponses streams, as pure functions over what an agent
//! sent: no I/O here, so every rule is unit-tested on hand-made streams. The rules and their
//! sources are in `docs/protocols-research.md` §5 (MUST fails the check, WARN does not).
//! `check.rs` runs the cases over HTTP.

use serde_json::Value;

/// One problem found, with where it was seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub must: bool,
    /// The event's position in the stream (0-based), if it is about one event.
    pub at: Option<usize>,
    pub message: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let level = if self.must { "FAIL" } else { "warn" };
        match self.at {
            Some(i) => write!(f, "{level}: event #{i}: {}", self.message),
            None => write!(f, "{level}: {}", self.message),
        }
    }
}

/// One SSE frame: its `event:` line, if any, and its `data:` (joined).
#[derive(Debug, Clone)]
pub struct Frame {
    pub event: Option<String>,
    pub data: String,
}

/// Splits an SSE body into frames (comments and `id:`/`retry:` lines are kept out).
pub fn parse_sse(body: &str) -> Vec<Frame> {
    let mut frames = Vec::new();
    let mut event = None;
    let mut data: Vec<&str> = Vec::new();
    for line in body.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l)) {
        if line.is_empty() {
            if !data.is_empty() {
                frames.push(Frame {
                    event: event.take(),
                    data: data.join("\n"),
                });
            }
            event = None;
            data.clear();
        } else if let Some(v) = line.strip_prefix("event:") {
            event = Some(v.trim_start().to_owned());
        } else if let Some(v) = line.strip_prefix("data:") {
            data.push(v.strip_prefix(' ').unwrap_or(v));
        }
    }
    if !data.is_empty() {
        frames.push(Frame {
            event,
            data: data.join("\n"),
        });
    }
    frames
}

struct Out(Vec<Finding>);

impl Out {
    fn must(&mut self, at: Option<usize>, m: impl Into<String>) {
        self.0.push(Finding {
            must: true,
            at,
            message: m.into(),
        });
    }
    fn warn(&mut self, at: Option<usize>, m: impl Into<String>) {
        self.0.push(Finding {
            must: false,
            at,
            message: m.into(),
        });
    }
}

/// The required fields of a response object (`completed` responses).
pub fn check_response(r: &Value) -> Vec<Finding> {
    let mut out = Out(Vec::new());
    check_response_into(r, None, &mut out);
    out.0
}

fn check_response_into(r: &Value, at: Option<usize>, out: &mut Out) {
    let Some(obj) = r.as_object() else {
        out.must(at, "the response is not a JSON object");
        return;
    };
    for (key, ok) in [
        ("id", obj.get("id").is_some_and(Value::is_string)),
        (
            "object",
            obj.get("object") == Some(&Value::from("response")),
        ),
        (
            "created_at",
            obj.get("created_at").is_some_and(Value::is_number),
        ),
        ("status", obj.get("status").is_some_and(Value::is_string)),
        ("model", obj.get("model").is_some_and(Value::is_string)),
        ("output", obj.get("output").is_some_and(Value::is_array)),
    ] {
        if !ok {
            out.must(
                at,
                format!(
                    "response.{key} is missing or has the wrong type (object must be \"response\")"
                ),
            );
        }
    }
    for (i, item) in obj
        .get("output")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        for key in ["id", "type", "status"] {
            if !item.get(key).is_some_and(Value::is_string) {
                out.must(at, format!("response.output[{i}].{key} is missing"));
            }
        }
    }
}

/// The rules for one streamed response: framing, `sequence_number`, the lifecycle, the order of
/// each output item's events, and the closing `[DONE]`.
pub fn check_stream(frames: &[Frame]) -> Vec<Finding> {
    let mut out = Out(Vec::new());
    let done_at = frames.iter().position(|f| f.data.trim() == "[DONE]");
    match done_at {
        None => out.must(None, "the stream does not end with `data: [DONE]`"),
        Some(i) if i + 1 != frames.len() => out.must(Some(i + 1), "frames after `[DONE]`"),
        _ => {}
    }
    let events: Vec<(usize, Option<&str>, Value)> = frames
        .iter()
        .take(done_at.unwrap_or(frames.len()))
        .enumerate()
        .filter_map(|(i, f)| match serde_json::from_str::<Value>(&f.data) {
            Ok(v) => Some((i, f.event.as_deref(), v)),
            Err(e) => {
                out.must(Some(i), format!("data is not JSON: {e}"));
                None
            }
        })
        .collect();
    let mut last_seq: Option<i64> = None;
    let mut terminal: Option<usize> = None;
    // Per output index: the item id, whether done; per (index, content): the state.
    let mut items: std::collections::BTreeMap<i64, (String, bool, String)> = Default::default();
    let mut parts: std::collections::BTreeMap<(i64, i64), (u8, String)> = Default::default();
    for (n, (i, event_line, v)) in events.iter().enumerate() {
        let at = Some(*i);
        let Some(ty) = v.get("type").and_then(Value::as_str) else {
            out.must(at, "event without a `type`");
            continue;
        };
        if let Some(e) = event_line {
            if *e != ty {
                out.must(at, format!("`event: {e}` does not match type {ty}"));
            }
        }
        match v.get("sequence_number").and_then(Value::as_i64) {
            None => out.must(at, format!("{ty} has no integer sequence_number")),
            Some(s) => {
                match last_seq {
                    None if s != 0 => out.warn(at, format!("sequence_number starts at {s}, not 0")),
                    Some(p) if s <= p => out.must(
                        at,
                        format!("sequence_number {s} after {p}: not strictly increasing"),
                    ),
                    Some(p) if s != p + 1 => {
                        out.warn(at, format!("sequence_number jumps from {p} to {s}"))
                    }
                    _ => {}
                }
                last_seq = Some(s);
            }
        }
        if terminal.is_some() {
            out.must(at, format!("{ty} after the terminal event"));
        }
        if n == 0 && ty != "response.created" {
            out.must(at, format!("the first event is {ty}, not response.created"));
        }
        let index = v.get("output_index").and_then(Value::as_i64);
        let content = v.get("content_index").and_then(Value::as_i64);
        let item_id = v.get("item_id").and_then(Value::as_str);
        match ty {
            "response.created" | "response.in_progress" | "response.queued" => {
                if !items.is_empty() && ty != "response.created" {
                    out.must(at, format!("{ty} after output items began"));
                }
                if n != 0 && ty == "response.created" {
                    out.must(at, "a second response.created");
                }
            }
            "response.completed" | "response.failed" | "response.incomplete" => {
                terminal = Some(*i);
                let want = ty.trim_start_matches("response.");
                let status = v.pointer("/response/status").and_then(Value::as_str);
                if status != Some(want) {
                    out.must(
                        at,
                        format!("{ty} carries response.status {status:?}, not {want:?}"),
                    );
                }
                if let Some(r) = v.get("response") {
                    check_response_into(r, at, &mut out);
                }
                if let Some((idx, _)) = items.iter().find(|(_, (_, done, _))| !done) {
                    out.must(at, format!("{ty} before output item {idx} was done"));
                }
            }
            "response.output_item.added" => match index {
                None => out.must(at, "output_item.added without output_index"),
                Some(idx) if items.contains_key(&idx) => {
                    out.must(at, format!("output item {idx} added twice"))
                }
                Some(idx) => {
                    let id = v
                        .pointer("/item/id")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned();
                    if id.is_empty() {
                        out.must(at, format!("output item {idx} has no item.id"));
                    }
                    items.insert(idx, (id, false, String::new()));
                }
            },
            "response.output_item.done" => {
                match index.and_then(|i| items.get_mut(&i).map(|e| (i, e))) {
                    None => out.must(at, "output_item.done for an item never added"),
                    Some((idx, (_, done, text))) => {
                        if *done {
                            out.must(at, format!("output item {idx} done twice"));
                        }
                        *done = true;
                        if let Some(t) = v.pointer("/item/content/0/text").and_then(Value::as_str) {
                            if !text.is_empty() && t != text {
                                out.must(
                                    at,
                                    format!("output item {idx}'s text differs from its deltas"),
                                );
                            }
                        }
                        if parts
                            .iter()
                            .any(|((i, _), (state, _))| *i == idx && *state != 3)
                        {
                            out.must(
                                at,
                                format!("output item {idx} done before its content parts"),
                            );
                        }
                    }
                }
            }
            "response.function_call_arguments.delta" | "response.function_call_arguments.done" => {
                let Some(idx) = index else {
                    out.must(at, format!("{ty} without output_index"));
                    continue;
                };
                let Some(args) = open_item(&mut items, idx, item_id, ty, at, &mut out) else {
                    continue;
                };
                if ty.ends_with(".delta") {
                    args.push_str(v.get("delta").and_then(Value::as_str).unwrap_or_default());
                } else {
                    let a = v.get("arguments").and_then(Value::as_str);
                    if a != Some(args.as_str()) {
                        out.must(
                            at,
                            format!("function_call_arguments.done arguments {a:?} differ from its deltas {args:?}"),
                        );
                    }
                }
            }
            "response.content_part.added"
            | "response.output_text.delta"
            | "response.output_text.done"
            | "response.content_part.done" => {
                let (Some(idx), Some(ci)) = (index, content) else {
                    out.must(at, format!("{ty} without output_index and content_index"));
                    continue;
                };
                let Some(text) = open_item(&mut items, idx, item_id, ty, at, &mut out) else {
                    continue;
                };
                // 0 = nothing yet, 1 = part added, 2 = text done, 3 = part done.
                let entry = parts.entry((idx, ci)).or_insert((0, String::new()));
                let next = match (ty, entry.0) {
                    ("response.content_part.added", 0) => Some(1),
                    ("response.output_text.delta", 1) => {
                        if let Some(d) = v.get("delta").and_then(Value::as_str) {
                            entry.1.push_str(d);
                        }
                        Some(1)
                    }
                    ("response.output_text.done", 1) => {
                        let t = v.get("text").and_then(Value::as_str).unwrap_or_default();
                        if t != entry.1 {
                            out.must(
                                at,
                                format!(
                                    "output_text.done text differs from its deltas ({t:?} vs {:?})",
                                    entry.1
                                ),
                            );
                        }
                        text.clone_from(&entry.1);
                        Some(2)
                    }
                    ("response.content_part.done", 1 | 2) => Some(3),
                    _ => None,
                };
                match next {
                    Some(s) => entry.0 = s,
                    None => out.must(
                        at,
                        format!("{ty} out of order for output item {idx}, content part {ci}"),
                    ),
                }
            }
            _ => {}
        }
    }
    if terminal.is_none() {
        out.must(
            None,
            "no terminal event (response.completed, failed or incomplete)",
        );
    }
    out.0
}

/// The output item an event about item `idx`'s content is for, checked: added, not yet done,
/// and named by the event's `item_id`. Returns the text (or arguments) gathered so far.
fn open_item<'a>(
    items: &'a mut std::collections::BTreeMap<i64, (String, bool, String)>,
    idx: i64,
    item_id: Option<&str>,
    ty: &str,
    at: Option<usize>,
    out: &mut Out,
) -> Option<&'a mut String> {
    let Some((id, done, gathered)) = items.get_mut(&idx) else {
        out.must(at, format!("{ty} for output item {idx}, never added"));
        return None;
    };
    if *done {
        out.must(at, format!("{ty} for output item {idx} after it was done"));
    }
    if item_id != Some(id.as_str()) {
        out.must(
            at,
            format!("{ty}'s item_id {item_id:?} is not item {idx}'s id {id:?}"),
        );
    }
    Some(gathered)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// What `examples/notes` sends for "hi".
    fn good() -> String {
        let item = json!({"id": "msg_1", "type": "message", "status": "in_progress", "role": "assistant", "content": []});
        let done_item = json!({"id": "msg_1", "type": "message", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": "hi there", "annotations": []}]});
        let resp = |status: &str, output: Value| {
            json!({"id": "resp_1", "object": "response", "created_at": 1,
            "status": status, "model": "notes", "output": output})
        };
        let ids = json!({"item_id": "msg_1", "output_index": 0, "content_index": 0});
        let mut events = vec![
            json!({"type": "response.created", "response": resp("in_progress", json!([]))}),
            json!({"type": "response.in_progress", "response": resp("in_progress", json!([]))}),
            json!({"type": "response.output_item.added", "output_index": 0, "item": item}),
        ];
        let with = |mut v: Value, extra: Value| {
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            v
        };
        events.push(with(json!({"type": "response.content_part.added", "part": {"type": "output_text", "text": ""}}), ids.clone()));
        events.push(with(
            json!({"type": "response.output_text.delta", "delta": "hi "}),
            ids.clone(),
        ));
        events.push(with(
            json!({"type": "response.output_text.delta", "delta": "there"}),
            ids.clone(),
        ));
        events.push(with(
            json!({"type": "response.output_text.done", "text": "hi there"}),
            ids.clone(),
        ));
        events.push(with(json!({"type": "response.content_part.done", "part": {"type": "output_text", "text": "hi there"}}), ids));
        events.push(json!({"type": "response.output_item.done", "output_index": 0, "item": done_item.clone()}));
        events.push(json!({"type": "response.completed", "response": resp("completed", json!([done_item]))}));
        let mut body = String::new();
        for (seq, mut e) in events.into_iter().enumerate() {
            e["sequence_number"] = json!(seq);
            body.push_str(&format!(
                "event: {}\ndata: {}\n\n",
                e["type"].as_str().unwrap(),
                e
            ));
        }
        body.push_str("data: [DONE]\n\n");
        body
    }

    fn musts(body: &str) -> Vec<String> {
        check_stream(&parse_sse(body))
            .into_iter()
            .filter(|f| f.must)
            .map(|f| f.to_string())
            .collect()
    }

    #[test]
    fn a_conforming_stream_passes() {
        assert_eq!(check_stream(&parse_sse(&good())), vec![]);
    }

    #[test]
    fn a_missing_done_fails() {
        let body = good().replace("data: [DONE]\n\n", "");
        assert_eq!(
            musts(&body),
            ["FAIL: the stream does not end with `data: [DONE]`"]
        );
    }

    #[test]
    fn out_of_order_events_fail_with_where() {
        // The text's done before its content part was added.
        let frames = parse_sse(&good());
        let mut swapped = frames.clone();
        swapped.swap(3, 6);
        let found = check_stream(&swapped);
        assert!(
            found
                .iter()
                .any(|f| f.must && f.at == Some(3) && f.message.contains("out of order")),
            "{found:?}"
        );
        assert!(
            found
                .iter()
                .any(|f| f.message.contains("not strictly increasing")),
            "{found:?}"
        );
    }

    #[test]
    fn missing_required_fields_fail() {
        let body = good().replace(r#""model":"notes","#, "");
        let m = musts(&body);
        assert!(
            m.iter().any(|f| f.contains("response.model is missing")),
            "{m:?}"
        );
        let body = good().replace(r#""sequence_number":5,"#, "");
        let m = musts(&body);
        assert!(
            m.iter().any(|f| f.contains("no integer sequence_number")),
            "{m:?}"
        );
    }

    #[test]
    fn deltas_must_add_up_to_the_text() {
        let body = good().replace(r#""delta":"there""#, r#""delta":"where""#);
        let m = musts(&body);
        assert!(
            m.iter().any(|f| f.contains("differs from its deltas")),
            "{m:?}"
        );
    }
}
