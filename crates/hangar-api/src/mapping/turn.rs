//! One agent turn on `/responses`, normalised: whatever the agent streams (or answers whole),
//! the mapped protocols see the same [`Step`]s, in an order every consumer accepts. Nothing
//! interleaves (older AG-UI verifiers forbid it): a text message is closed before a tool call
//! opens, and while a tool call is open, everything about other items waits until it is done
//! (a consumer acts on a call at its end, so a call must never end before its arguments are
//! whole). Nothing is left open at the end, empty deltas are dropped, and text or calls that
//! only the final response holds are still delivered. Bounded: a turn with more items, or
//! more held back, than a real one has fails.

use std::collections::{HashMap, HashSet};

use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    TextStart {
        id: String,
    },
    TextDelta {
        id: String,
        delta: String,
    },
    TextEnd {
        id: String,
    },
    ToolStart {
        call_id: String,
        name: String,
    },
    ToolArgs {
        call_id: String,
        delta: String,
    },
    ToolEnd {
        call_id: String,
    },
    /// The turn ended; the final response object (`status` completed or incomplete).
    Done {
        response: Value,
    },
    /// The turn failed: the agent's own words where it gave them.
    Failed {
        message: String,
        code: Option<String>,
    },
}

#[derive(Default)]
pub struct Turn {
    /// The open text message, by item id.
    text: Option<String>,
    /// The open tool call: (item id, call id).
    tool: Option<(String, String)>,
    /// Function-call item id → (call id, name), from `output_item.added`.
    calls: HashMap<String, (String, String)>,
    /// Items whose content was delivered (text deltas or call arguments seen).
    delivered: HashSet<String>,
    /// Calls whose arguments came as deltas.
    args_streamed: HashSet<String>,
    finished: bool,
    anon: u32,
    /// Events about other items, held while a tool call is open.
    backlog: std::collections::VecDeque<Value>,
    backlog_bytes: usize,
    /// Set at the terminal event: what is held is delivered in order, without holding.
    flushing: bool,
}

/// The most output items one turn may have.
const MAX_ITEMS: usize = 10_000;
/// The most held back behind an open tool call.
const MAX_BACKLOG: usize = 16 * 1024 * 1024;

fn str_of<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

impl Turn {
    pub fn finished(&self) -> bool {
        self.finished
    }

    fn close(&mut self, out: &mut Vec<Step>) {
        if let Some(id) = self.text.take() {
            out.push(Step::TextEnd { id });
        }
        if let Some((_, call_id)) = self.tool.take() {
            out.push(Step::ToolEnd { call_id });
        }
    }

    fn text_delta(&mut self, item: &str, delta: &str, out: &mut Vec<Step>) {
        if delta.is_empty() {
            return;
        }
        if self.text.as_deref() != Some(item) {
            self.close(out);
            self.text = Some(item.to_owned());
            out.push(Step::TextStart {
                id: item.to_owned(),
            });
        }
        self.delivered.insert(item.to_owned());
        out.push(Step::TextDelta {
            id: item.to_owned(),
            delta: delta.to_owned(),
        });
    }

    fn tool_start(&mut self, item: &str, call_id: &str, name: &str, out: &mut Vec<Step>) {
        if self.tool.as_ref().is_some_and(|(i, _)| i == item) {
            return;
        }
        self.close(out);
        self.tool = Some((item.to_owned(), call_id.to_owned()));
        self.delivered.insert(item.to_owned());
        out.push(Step::ToolStart {
            call_id: call_id.to_owned(),
            name: name.to_owned(),
        });
    }

    fn item_id(&mut self, v: &Value) -> String {
        match str_of(v, "item_id").or_else(|| str_of(v, "id")) {
            Some(id) => id.to_owned(),
            None => {
                // An agent that names no item still gets one message per output index.
                let idx = v.get("output_index").and_then(Value::as_u64).unwrap_or(0);
                format!("msg_{idx}")
            }
        }
    }

    /// Delivers an output item whole (a final response's, or an `output_item.done`'s)
    /// unless its content already went out as deltas.
    fn whole_item(&mut self, item: &Value, out: &mut Vec<Step>) {
        let id = match str_of(item, "id") {
            Some(id) => id.to_owned(),
            None => {
                self.anon += 1;
                format!("item_{}", self.anon)
            }
        };
        match str_of(item, "type") {
            Some("message") => {
                if self.delivered.contains(&id) {
                    if self.text.as_deref() == Some(id.as_str()) {
                        self.close(out);
                    }
                    return;
                }
                let text: String = item
                    .get("content")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter(|p| matches!(str_of(p, "type"), Some("output_text" | "text")))
                    .filter_map(|p| str_of(p, "text"))
                    .collect();
                self.text_delta(&id, &text, out);
                self.close(out);
            }
            Some("function_call") => {
                let call_id = str_of(item, "call_id").unwrap_or(&id).to_owned();
                let name = str_of(item, "name").unwrap_or_default().to_owned();
                if !self.args_streamed.contains(&id) || !self.delivered.contains(&id) {
                    // Arguments only the whole item holds go out inside an open call.
                    self.tool_start(&id, &call_id, &name, out);
                }
                if !self.args_streamed.contains(&id) {
                    let args = str_of(item, "arguments").unwrap_or_default();
                    if !args.is_empty() {
                        out.push(Step::ToolArgs {
                            call_id: call_id.clone(),
                            delta: args.to_owned(),
                        });
                    }
                    self.args_streamed.insert(id.clone());
                }
                if self.tool.as_ref().is_some_and(|(i, _)| *i == id) {
                    self.close(out);
                }
            }
            _ => {} // reasoning and the like have no counterpart
        }
    }

    /// The output item an event is about, if it is about one.
    fn item_of(&self, v: &Value) -> Option<String> {
        match str_of(v, "type").unwrap_or_default() {
            "response.output_text.delta"
            | "response.refusal.delta"
            | "response.function_call_arguments.delta" => {
                Some(str_of(v, "item_id").map(str::to_owned).unwrap_or_else(|| {
                    let idx = v.get("output_index").and_then(Value::as_u64).unwrap_or(0);
                    format!("msg_{idx}")
                }))
            }
            "response.output_item.added" | "response.output_item.done" => v
                .get("item")
                .and_then(|i| str_of(i, "id"))
                .map(str::to_owned),
            _ => None,
        }
    }

    /// One event of the agent's stream.
    pub fn event(&mut self, v: &Value, out: &mut Vec<Step>) {
        if self.finished {
            return;
        }
        if !self.flushing {
            if let (Some((open, _)), Some(item)) = (&self.tool, self.item_of(v)) {
                if *open != item {
                    self.backlog_bytes += v.to_string().len();
                    if self.backlog_bytes > MAX_BACKLOG {
                        return self.fail(
                            "the agent streamed too much beside one open tool call".into(),
                            None,
                            out,
                        );
                    }
                    self.backlog.push_back(v.clone());
                    return;
                }
            }
        }
        let was_open = self.tool.is_some();
        self.event_now(v, out);
        if was_open && self.tool.is_none() && !self.flushing {
            // The call is done: what waited behind it goes out now, in order (it may
            // open another call, behind which the rest waits again).
            let held: Vec<Value> = std::mem::take(&mut self.backlog).into();
            self.backlog_bytes = 0;
            for e in held {
                self.event(&e, out);
            }
        }
    }

    fn event_now(&mut self, v: &Value, out: &mut Vec<Step>) {
        if self.calls.len() + self.delivered.len() > MAX_ITEMS {
            return self.fail(
                format!("the agent's response has more than {MAX_ITEMS} output items"),
                None,
                out,
            );
        }
        match str_of(v, "type").unwrap_or_default() {
            "response.output_text.delta" | "response.refusal.delta" => {
                let id = self.item_id(v);
                let delta = str_of(v, "delta").unwrap_or_default().to_owned();
                self.text_delta(&id, &delta, out);
            }
            "response.output_item.added" => {
                let item = v.get("item").cloned().unwrap_or_default();
                if str_of(&item, "type") == Some("function_call") {
                    let id = self.item_id(&item);
                    let call_id = str_of(&item, "call_id").unwrap_or(&id).to_owned();
                    let name = str_of(&item, "name").unwrap_or_default().to_owned();
                    self.calls
                        .insert(id.clone(), (call_id.clone(), name.clone()));
                    self.tool_start(&id, &call_id, &name, out);
                }
            }
            "response.function_call_arguments.delta" => {
                let id = self.item_id(v);
                let delta = str_of(v, "delta").unwrap_or_default().to_owned();
                let Some((call_id, name)) = self.calls.get(&id).cloned() else {
                    return; // arguments of a call never announced: the final item has them
                };
                if delta.is_empty() {
                    return;
                }
                if self.tool.as_ref().is_none_or(|(i, _)| *i != id) {
                    self.close(out);
                    // Opened again after text came between (AG-UI 1.x lets a closed call
                    // be reopened by a new start; its arguments append).
                    self.tool = Some((id.clone(), call_id.clone()));
                    self.delivered.insert(id.clone());
                    out.push(Step::ToolStart {
                        call_id: call_id.clone(),
                        name,
                    });
                }
                self.args_streamed.insert(id);
                out.push(Step::ToolArgs { call_id, delta });
            }
            "response.output_item.done" => {
                if let Some(item) = v.get("item") {
                    self.whole_item(&item.clone(), out);
                }
            }
            "response.completed" | "response.incomplete" => {
                self.flush(out);
                let response = v.get("response").cloned().unwrap_or_default();
                self.done(response, out);
            }
            "response.failed" => {
                let err = v.get("response").and_then(|r| r.get("error"));
                self.fail(
                    err.and_then(|e| str_of(e, "message"))
                        .unwrap_or("the agent's response failed")
                        .to_owned(),
                    err.and_then(|e| str_of(e, "code")).map(str::to_owned),
                    out,
                );
            }
            "error" => {
                // Both shapes: nested (`error: {message, code}`) and flat (`message`, `code`).
                let e = v.get("error").filter(|e| e.is_object()).unwrap_or(v);
                self.fail(
                    str_of(e, "message")
                        .unwrap_or("the agent reported an error")
                        .to_owned(),
                    str_of(e, "code").map(str::to_owned),
                    out,
                );
            }
            _ => {}
        }
    }

    /// The agent answered with a whole response object instead of a stream.
    pub fn whole(&mut self, response: Value, out: &mut Vec<Step>) {
        if str_of(&response, "status") == Some("failed") {
            let err = response.get("error");
            return self.fail(
                err.and_then(|e| str_of(e, "message"))
                    .unwrap_or("the agent's response failed")
                    .to_owned(),
                err.and_then(|e| str_of(e, "code")).map(str::to_owned),
                out,
            );
        }
        self.done(response, out);
    }

    /// Delivers what is held, in order, without holding any more.
    fn flush(&mut self, out: &mut Vec<Step>) {
        self.flushing = true;
        let held: Vec<Value> = std::mem::take(&mut self.backlog).into();
        for e in held {
            self.event_now(&e, out);
        }
    }

    fn done(&mut self, response: Value, out: &mut Vec<Step>) {
        for item in response
            .get("output")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
        {
            self.whole_item(&item, out);
        }
        self.close(out);
        self.finished = true;
        out.push(Step::Done { response });
    }

    pub fn fail(&mut self, message: String, code: Option<String>, out: &mut Vec<Step>) {
        if self.finished {
            return;
        }
        self.close(out);
        self.finished = true;
        out.push(Step::Failed { message, code });
    }

    /// The agent's stream ended: without a terminal event, the turn failed.
    pub fn end(&mut self, out: &mut Vec<Step>) {
        if !self.finished {
            self.fail(
                "the agent's stream ended before its response completed".into(),
                Some("truncated".into()),
                out,
            );
        }
    }
}

/// The text of a final response: its assistant messages' text, messages apart by a blank line.
pub fn output_text(response: &Value) -> String {
    let messages: Vec<String> = response
        .get("output")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|item| str_of(item, "type") == Some("message"))
        .map(|item| {
            item.get("content")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter(|p| matches!(str_of(p, "type"), Some("output_text" | "text")))
                .filter_map(|p| str_of(p, "text"))
                .collect::<String>()
        })
        .filter(|t| !t.is_empty())
        .collect();
    messages.join("\n\n")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn run(events: &[Value]) -> Vec<Step> {
        let mut t = Turn::default();
        let mut out = vec![];
        for e in events {
            t.event(e, &mut out);
        }
        t.end(&mut out);
        out
    }

    fn text_events(id: &str, parts: &[&str]) -> Vec<Value> {
        let mut v = vec![
            json!({"type": "response.output_item.added", "output_index": 0, "item": {"id": id, "type": "message", "content": []}}),
        ];
        for p in parts {
            v.push(json!({"type": "response.output_text.delta", "item_id": id, "output_index": 0, "content_index": 0, "delta": p}));
        }
        v.push(json!({"type": "response.output_item.done", "output_index": 0, "item": {"id": id, "type": "message", "content": [{"type": "output_text", "text": parts.concat()}]}}));
        v
    }

    #[test]
    fn text_streams_once_and_closes() {
        let mut events = vec![json!({"type": "response.created", "response": {"id": "r"}})];
        events.extend(text_events("m1", &["he", "", "llo"]));
        let done = json!({"id": "r", "status": "completed", "output": [{"id": "m1", "type": "message", "content": [{"type": "output_text", "text": "hello"}]}]});
        events.push(json!({"type": "response.completed", "response": done}));
        let steps = run(&events);
        assert_eq!(
            steps,
            [
                Step::TextStart { id: "m1".into() },
                Step::TextDelta {
                    id: "m1".into(),
                    delta: "he".into()
                },
                Step::TextDelta {
                    id: "m1".into(),
                    delta: "llo".into()
                },
                Step::TextEnd { id: "m1".into() },
                Step::Done { response: done },
            ]
        );
    }

    #[test]
    fn a_tool_call_never_interleaves_with_text() {
        let call = json!({"id": "fc1", "type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": ""});
        let mut events = vec![
            json!({"type": "response.output_text.delta", "item_id": "m1", "delta": "let me check"}),
            json!({"type": "response.output_item.added", "output_index": 1, "item": call}),
            json!({"type": "response.function_call_arguments.delta", "item_id": "fc1", "delta": "{\"city\""}),
            json!({"type": "response.output_text.delta", "item_id": "m1", "delta": "..."}),
            json!({"type": "response.function_call_arguments.delta", "item_id": "fc1", "delta": ":\"Paris\"}"}),
        ];
        let mut done_call = call.clone();
        done_call["arguments"] = json!("{\"city\":\"Paris\"}");
        events.push(json!({"type": "response.output_item.done", "item": done_call}));
        events.push(json!({"type": "response.completed", "response": {"id": "r", "output": []}}));
        let steps = run(&events);
        well_formed(&steps);
        // The call ends only once its arguments are whole; the text waits behind it.
        let end = steps
            .iter()
            .position(|s| matches!(s, Step::ToolEnd { .. }))
            .unwrap();
        let last_args = steps
            .iter()
            .rposition(|s| matches!(s, Step::ToolArgs { .. }))
            .unwrap();
        assert!(last_args < end, "{steps:?}");
        assert_eq!(
            steps
                .iter()
                .filter(|s| matches!(s, Step::ToolStart { .. }))
                .count(),
            1
        );
        let args: String = steps
            .iter()
            .filter_map(|s| match s {
                Step::ToolArgs { delta, .. } => Some(delta.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(args, "{\"city\":\"Paris\"}");
        assert!(steps.contains(&Step::ToolStart {
            call_id: "call_1".into(),
            name: "get_weather".into()
        }));
    }

    /// Nothing interleaves, nothing is content or an end outside its start.
    fn well_formed(steps: &[Step]) {
        let mut open: Option<String> = None;
        for s in steps {
            match s {
                Step::TextStart { id } | Step::ToolStart { call_id: id, .. } => {
                    assert!(open.is_none(), "{s:?} while {open:?} is open: {steps:?}");
                    open = Some(id.clone());
                }
                Step::TextEnd { id } | Step::ToolEnd { call_id: id } => {
                    assert_eq!(open.take().as_ref(), Some(id), "{steps:?}");
                }
                Step::TextDelta { id, .. } | Step::ToolArgs { call_id: id, .. } => {
                    assert_eq!(open.as_ref(), Some(id), "{steps:?}");
                }
                Step::Done { .. } | Step::Failed { .. } => assert!(open.is_none()),
            }
        }
    }

    #[test]
    fn calls_announced_together_come_out_one_after_the_other() {
        let call = |n: &str| json!({"id": format!("fc{n}"), "type": "function_call", "call_id": format!("c{n}"), "name": "f", "arguments": ""});
        let done = |n: &str| {
            let mut c = call(n);
            c["arguments"] = json!(format!("{{\"n\":{n}}}"));
            json!({"type": "response.output_item.done", "item": c})
        };
        let steps = run(&[
            json!({"type": "response.output_item.added", "output_index": 0, "item": call("1")}),
            json!({"type": "response.output_item.added", "output_index": 1, "item": call("2")}),
            json!({"type": "response.function_call_arguments.delta", "item_id": "fc2", "delta": "{\"n\":2}"}),
            done("1"),
            done("2"),
            json!({"type": "response.completed", "response": {"id": "r", "output": []}}),
        ]);
        well_formed(&steps);
        assert_eq!(
            steps[..6],
            [
                Step::ToolStart {
                    call_id: "c1".into(),
                    name: "f".into()
                },
                Step::ToolArgs {
                    call_id: "c1".into(),
                    delta: "{\"n\":1}".into()
                },
                Step::ToolEnd {
                    call_id: "c1".into()
                },
                Step::ToolStart {
                    call_id: "c2".into(),
                    name: "f".into()
                },
                Step::ToolArgs {
                    call_id: "c2".into(),
                    delta: "{\"n\":2}".into()
                },
                Step::ToolEnd {
                    call_id: "c2".into()
                },
            ]
        );
    }

    #[test]
    fn what_only_the_final_response_holds_is_delivered() {
        let mut t = Turn::default();
        let mut out = vec![];
        t.whole(
            json!({"id": "r", "status": "completed", "output": [
                {"id": "m", "type": "message", "content": [{"type": "output_text", "text": "hi"}]},
                {"id": "f", "type": "function_call", "call_id": "c", "name": "n", "arguments": "{}"},
            ]}),
            &mut out,
        );
        assert_eq!(out.len(), 7, "{out:?}");
        assert_eq!(out[0], Step::TextStart { id: "m".into() });
        assert_eq!(
            out[3],
            Step::ToolStart {
                call_id: "c".into(),
                name: "n".into()
            }
        );
        assert_eq!(
            out[4],
            Step::ToolArgs {
                call_id: "c".into(),
                delta: "{}".into()
            }
        );
    }

    #[test]
    fn failures_and_truncation_close_what_is_open() {
        let steps = run(&[
            json!({"type": "response.output_text.delta", "item_id": "m", "delta": "par"}),
            json!({"type": "error", "code": "rate_limited", "message": "slow down"}),
        ]);
        assert_eq!(steps[2], Step::TextEnd { id: "m".into() });
        assert_eq!(
            steps[3],
            Step::Failed {
                message: "slow down".into(),
                code: Some("rate_limited".into())
            }
        );
        let steps =
            run(&[json!({"type": "response.output_text.delta", "item_id": "m", "delta": "par"})]);
        assert!(
            matches!(steps.last(), Some(Step::Failed { code: Some(c), .. }) if c == "truncated")
        );
    }

    #[test]
    fn output_text_joins_messages() {
        let r = json!({"output": [
            {"type": "message", "content": [{"type": "output_text", "text": "a"}, {"type": "output_text", "text": "b"}]},
            {"type": "function_call"},
            {"type": "message", "content": [{"type": "output_text", "text": "c"}]},
        ]});
        assert_eq!(output_text(&r), "ab\n\nc");
    }
}
