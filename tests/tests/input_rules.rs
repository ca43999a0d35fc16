//! Every request message of every method, driven from the descriptor set
//! with boundary values in each field against a real server. The expected
//! outcome comes from each field's documented rules (the `tether.v1.input`
//! field option, see `proto/tether/v1/rules.proto`): a value inside them is
//! never refused as invalid; a value outside them is refused with
//! INVALID_ARGUMENT naming the field. Services and messages are enumerated
//! from the descriptor set, so methods added later are covered without
//! touching this test; afterwards the server must still serve.

use std::collections::HashMap;

use bytes::Bytes;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use prost::Message as _;
use prost_reflect::ReflectMessage;
use prost_reflect::{
    DescriptorPool, DynamicMessage, ExtensionDescriptor, FieldDescriptor, Kind, MapKey, MessageDescriptor,
    MethodDescriptor, Value,
};
use tether::time::{MAX_DURATION_SECONDS, MAX_TIMESTAMP_SECONDS, MIN_TIMESTAMP_SECONDS};
use tether::v1 as pb;
use tether_tests::{violated_fields, DataDir, RawCodec, TestServer, WAIT};
use tonic::Code;

/// Outcomes that are not a verdict on the input's validity.
const ACCEPTING: [Code; 4] = [Code::Ok, Code::NotFound, Code::FailedPrecondition, Code::AlreadyExists];
/// How deep mutations reach into nested messages.
const DEPTH: usize = 4;
const HUGE: usize = 1 << 20;

struct Api {
    pool: DescriptorPool,
    input: ExtensionDescriptor,
}

impl Api {
    fn load() -> Api {
        let pool = DescriptorPool::decode(tether::FILE_DESCRIPTOR_SET).expect("descriptor set");
        let input = pool.get_extension_by_name("tether.v1.input").expect("the input rules option");
        Api { pool, input }
    }

    fn rules(&self, field: &FieldDescriptor) -> pb::InputRules {
        let options = field.options();
        if !options.has_extension(&self.input) {
            return pb::InputRules::default();
        }
        match options.get_extension(&self.input).as_ref() {
            Value::Message(m) => m.transcode_to::<pb::InputRules>().expect("rules decode"),
            other => panic!("rules of {} are {other:?}", field.full_name()),
        }
    }

    fn methods(&self) -> Vec<MethodDescriptor> {
        self.pool
            .services()
            .filter(|s| s.package_name() == "tether.v1")
            .flat_map(|s| s.methods().collect::<Vec<_>>())
            .collect()
    }
}

// ---- what the rules say -------------------------------------------------------

/// A field the server must name when it refuses the request.
#[derive(Debug, Clone, PartialEq)]
enum Expect {
    Exact(String),
    /// An entry of a map: the server names `field["key"]` (a long key cut).
    EntryOf(String),
}

impl Expect {
    fn matches(&self, named: &str) -> bool {
        match self {
            Expect::Exact(path) => named == path,
            Expect::EntryOf(path) => named.starts_with(&format!("{path}[")),
        }
    }
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

fn is_name(s: &str) -> bool {
    s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Whether a Timestamp / Duration message holds a valid value.
fn timestamp_ok(m: &DynamicMessage) -> bool {
    let (s, n) = seconds_nanos(m);
    (MIN_TIMESTAMP_SECONDS..=MAX_TIMESTAMP_SECONDS).contains(&s) && (0..1_000_000_000).contains(&n)
}

fn seconds_nanos(m: &DynamicMessage) -> (i64, i32) {
    let s = m.get_field_by_name("seconds").and_then(|v| v.as_i64()).unwrap_or(0);
    let n = m.get_field_by_name("nanos").and_then(|v| v.as_i32()).unwrap_or(0);
    (s, n)
}

fn duration_nanos(m: &DynamicMessage) -> Option<i128> {
    let (s, n) = seconds_nanos(m);
    let valid = (-MAX_DURATION_SECONDS..=MAX_DURATION_SECONDS).contains(&s)
        && (-999_999_999..=999_999_999).contains(&n)
        && !(s > 0 && n < 0 || s < 0 && n > 0);
    valid.then(|| i128::from(s) * 1_000_000_000 + i128::from(n))
}

fn rule_duration_nanos(d: &Option<prost_types::Duration>) -> Option<i128> {
    d.as_ref().map(|d| i128::from(d.seconds) * 1_000_000_000 + i128::from(d.nanos))
}

fn int_of(v: &Value) -> Option<i128> {
    match v {
        Value::I32(x) => Some((*x).into()),
        Value::I64(x) => Some((*x).into()),
        Value::U32(x) => Some((*x).into()),
        Value::U64(x) => Some((*x).into()),
        Value::EnumNumber(x) => Some((*x).into()),
        _ => None,
    }
}

impl Api {
    /// Every rule `msg` breaks, as the fields the server may name.
    fn violations(&self, msg: &DynamicMessage, path: &str, out: &mut Vec<Expect>) {
        for field in msg.descriptor().fields() {
            let rules = self.rules(&field);
            if rules.output_only {
                continue;
            }
            let fpath = join(path, field.name());
            let value = msg.get_field(&field);
            if field.is_map() {
                let Value::Map(map) = value.as_ref() else { continue };
                if (rules.required && map.is_empty()) || (rules.max_len > 0 && map.len() as u64 > rules.max_len) {
                    out.push(Expect::Exact(fpath.clone()));
                }
                let entry = field.kind();
                let entry = entry.as_message().expect("map entry");
                for (k, v) in map {
                    let MapKey::String(key) = k else { continue };
                    let key = Value::String(key.clone());
                    let mut bad = Vec::new();
                    self.scalar(&entry.map_entry_key_field(), &key, rules.keys.as_deref(), msg, &fpath, &mut bad);
                    self.scalar(&entry.map_entry_value_field(), v, rules.values.as_deref(), msg, &fpath, &mut bad);
                    if !bad.is_empty() {
                        out.push(Expect::EntryOf(fpath.clone()));
                    }
                }
            } else if field.is_list() {
                let Value::List(items) = value.as_ref() else { continue };
                if (rules.required && items.is_empty()) || (rules.max_len > 0 && items.len() as u64 > rules.max_len) {
                    out.push(Expect::Exact(fpath.clone()));
                }
                for (i, item) in items.iter().enumerate() {
                    let ipath = format!("{fpath}[{i}]");
                    match item {
                        Value::Message(m) => self.message_value(&field, m, &ipath, out),
                        scalar => self.scalar(&field, scalar, rules.items.as_deref(), msg, &ipath, out),
                    }
                }
            } else {
                if field.containing_oneof().is_some() && !msg.has_field(&field) {
                    continue;
                }
                match value.as_ref() {
                    Value::Message(m) => {
                        if !msg.has_field(&field) {
                            if rules.required {
                                out.push(Expect::Exact(fpath));
                            }
                            continue;
                        }
                        self.message_value(&field, m, &fpath, out);
                        self.duration_rules(m, &rules, &fpath, out);
                    }
                    scalar => self.scalar(&field, scalar, Some(&rules), msg, &fpath, out),
                }
            }
        }
    }

    fn message_value(&self, field: &FieldDescriptor, m: &DynamicMessage, path: &str, out: &mut Vec<Expect>) {
        match m.descriptor().full_name() {
            "google.protobuf.Timestamp" => {
                if !timestamp_ok(m) {
                    out.push(Expect::Exact(path.to_string()));
                }
            }
            "google.protobuf.Duration" => {
                if duration_nanos(m).is_none() {
                    out.push(Expect::Exact(path.to_string()));
                }
            }
            "google.protobuf.FieldMask" => {}
            _ => {
                let _ = field;
                self.violations(m, path, out);
            }
        }
    }

    fn duration_rules(&self, m: &DynamicMessage, rules: &pb::InputRules, path: &str, out: &mut Vec<Expect>) {
        if m.descriptor().full_name() != "google.protobuf.Duration" {
            return;
        }
        let Some(n) = duration_nanos(m) else { return };
        let low = rule_duration_nanos(&rules.min_duration);
        let high = rule_duration_nanos(&rules.max_duration);
        if low.is_some_and(|l| n < l) || high.is_some_and(|h| n > h) {
            out.push(Expect::Exact(path.to_string()));
        }
    }

    /// The rules of one scalar value (a field, a list item, a map key or
    /// value) in `parent`.
    fn scalar(
        &self,
        field: &FieldDescriptor,
        value: &Value,
        rules: Option<&pb::InputRules>,
        parent: &DynamicMessage,
        path: &str,
        out: &mut Vec<Expect>,
    ) {
        let default = pb::InputRules::default();
        let rules = rules.unwrap_or(&default);
        let bad = match value {
            Value::String(s) => {
                (rules.required && s.is_empty())
                    || (!rules.truncated && rules.max_len > 0 && s.len() as u64 > rules.max_len)
                    || (rules.name && !s.is_empty() && !is_name(s))
                    || (rules.server_token && !s.is_empty())
            }
            Value::Bytes(b) => {
                (rules.required && b.is_empty()) || (rules.max_len > 0 && b.len() as u64 > rules.max_len)
            }
            Value::EnumNumber(n) => {
                let kind = field.kind();
                let defined = kind.as_enum().is_some_and(|e| e.get_value(*n).is_some());
                !defined || (rules.required && *n == 0)
            }
            v => match int_of(v) {
                None => false,
                Some(0) if rules.zero_means_default => false,
                Some(n) => {
                    let sibling = (!rules.at_most_field.is_empty())
                        .then(|| parent.get_field_by_name(&rules.at_most_field).and_then(|v| int_of(&v)))
                        .flatten();
                    (rules.required && n == 0)
                        || rules.min.is_some_and(|m| n < i128::from(m))
                        || rules.max.is_some_and(|m| n > i128::from(m))
                        || sibling.is_some_and(|s| s != 0 && n > s)
                }
            },
        };
        if bad {
            out.push(Expect::Exact(path.to_string()));
        }
    }
}

// ---- values to try ------------------------------------------------------------

fn wkt(pool: &DescriptorPool, name: &str, seconds: i64, nanos: i32) -> Value {
    let desc = pool.get_message_by_name(name).expect("well-known type");
    let mut m = DynamicMessage::new(desc);
    m.set_field_by_name("seconds", Value::I64(seconds));
    m.set_field_by_name("nanos", Value::I32(nanos));
    Value::Message(m)
}

impl Api {
    /// The smallest request the rules accept: required fields set.
    fn baseline(&self, desc: &MessageDescriptor, depth: usize) -> DynamicMessage {
        let mut m = DynamicMessage::new(desc.clone());
        match desc.full_name() {
            "google.protobuf.FieldMask" => {
                // The one field every updatable resource here has.
                m.set_field_by_name("paths", Value::List(vec![Value::String("description".into())]));
                return m;
            }
            // The stream's first message must be a Hello.
            "tether.v1.ConnectRequest" => {
                let hello = self.pool.get_message_by_name("tether.v1.Hello").expect("Hello");
                m.set_field_by_name("hello", Value::Message(self.baseline(&hello, depth + 1)));
                return m;
            }
            _ => {}
        }
        for field in desc.fields() {
            let rules = self.rules(&field);
            if !rules.required || depth > DEPTH + 2 {
                continue;
            }
            let value = match field.kind() {
                Kind::Message(sub) if field.is_list() => {
                    Value::List(vec![Value::Message(self.baseline(&sub, depth + 1))])
                }
                Kind::Message(sub) => Value::Message(self.baseline(&sub, depth + 1)),
                Kind::String => Value::String("a".into()),
                Kind::Bytes => Value::Bytes(Bytes::from_static(b"x")),
                Kind::Enum(_) => Value::EnumNumber(1),
                Kind::Uint32 => Value::U32(rules.min.map_or(1, |m| m.max(1) as u32)),
                Kind::Uint64 => Value::U64(rules.min.map_or(1, |m| m.max(1) as u64)),
                Kind::Int32 => Value::I32(rules.min.map_or(1, |m| m.max(1) as i32)),
                Kind::Int64 => Value::I64(rules.min.map_or(1, |m| m.max(1))),
                _ => continue,
            };
            m.set_field(&field, value);
        }
        // Integers with a lower bound above zero and no zero default.
        for field in desc.fields() {
            let rules = self.rules(&field);
            if field.is_list() || rules.required || rules.zero_means_default {
                continue;
            }
            if let Some(min) = rules.min.filter(|m| *m > 0) {
                let value = match field.kind() {
                    Kind::Uint32 => Value::U32(min as u32),
                    Kind::Uint64 => Value::U64(min as u64),
                    Kind::Int32 => Value::I32(min as i32),
                    Kind::Int64 => Value::I64(min),
                    _ => continue,
                };
                m.set_field(&field, value);
            }
        }
        m
    }

    /// Boundary values of a scalar of `kind` under `rules`.
    fn scalar_values(&self, kind: &Kind, rules: &pb::InputRules) -> Vec<Value> {
        let len = rules.max_len as usize;
        match kind {
            Kind::String => {
                let mut v = vec!["", "a", "a b", "é", "not-a-token", "x.y_z-9"]
                    .into_iter()
                    .map(|s| Value::String(s.into()))
                    .collect::<Vec<_>>();
                if len > 0 {
                    v.push(Value::String("a".repeat(len)));
                    v.push(Value::String("a".repeat(len + 1)));
                }
                v.push(Value::String("h".repeat(HUGE)));
                v
            }
            Kind::Bytes => {
                let mut v = vec![Value::Bytes(Bytes::new()), Value::Bytes(Bytes::from_static(b"\x00\xff"))];
                if len > 0 {
                    v.push(Value::Bytes(vec![b'b'; len].into()));
                    v.push(Value::Bytes(vec![b'b'; len + 1].into()));
                }
                v
            }
            Kind::Bool => vec![Value::Bool(true), Value::Bool(false)],
            Kind::Double => [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -1.0, 1e308, 0.0].map(Value::F64).to_vec(),
            Kind::Float => [f32::NAN, f32::INFINITY, -1.0, 0.0].map(Value::F32).to_vec(),
            Kind::Enum(e) => {
                let mut v: Vec<Value> = e.values().map(|x| Value::EnumNumber(x.number())).collect();
                v.extend([Value::EnumNumber(99), Value::EnumNumber(-1)]);
                v
            }
            Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
                let mut v = vec![0, 1, -1, i32::MAX, i32::MIN];
                for b in [rules.min, rules.max].into_iter().flatten() {
                    for x in [b - 1, b, b + 1] {
                        if let Ok(x) = i32::try_from(x) {
                            v.push(x);
                        }
                    }
                }
                v.into_iter().map(Value::I32).collect()
            }
            Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
                let mut v = vec![0, 1, -1, i64::MAX, i64::MIN];
                for b in [rules.min, rules.max].into_iter().flatten() {
                    v.extend([b.saturating_sub(1), b, b.saturating_add(1)]);
                }
                v.into_iter().map(Value::I64).collect()
            }
            Kind::Uint32 | Kind::Fixed32 => {
                let mut v = vec![0, 1, u32::MAX];
                for b in [rules.min, rules.max].into_iter().flatten() {
                    for x in [b - 1, b, b + 1] {
                        if let Ok(x) = u32::try_from(x) {
                            v.push(x);
                        }
                    }
                }
                v.into_iter().map(Value::U32).collect()
            }
            Kind::Uint64 | Kind::Fixed64 => {
                let mut v = vec![0, 1, u64::MAX];
                for b in [rules.min, rules.max].into_iter().flatten() {
                    for x in [b - 1, b, b + 1] {
                        if let Ok(x) = u64::try_from(x) {
                            v.push(x);
                        }
                    }
                }
                v.into_iter().map(Value::U64).collect()
            }
            Kind::Message(_) => Vec::new(),
        }
    }

    fn timestamps(&self) -> Vec<Value> {
        let t = |s, n| wkt(&self.pool, "google.protobuf.Timestamp", s, n);
        vec![
            t(0, 0),
            t(1_800_000_000, 5),
            t(MAX_TIMESTAMP_SECONDS, 999_999_999),
            t(MAX_TIMESTAMP_SECONDS + 1, 0),
            t(MIN_TIMESTAMP_SECONDS, 0),
            t(MIN_TIMESTAMP_SECONDS - 1, 0),
            t(-1, 0),
            t(1 << 62, 0),
            t(i64::MAX, 0),
            t(i64::MIN, 0),
            t(0, -1),
            t(0, 1_000_000_000),
        ]
    }

    fn durations(&self, rules: &pb::InputRules) -> Vec<Value> {
        let d = |s, n| wkt(&self.pool, "google.protobuf.Duration", s, n);
        let mut v = vec![
            d(0, 0),
            d(0, 1),
            d(1, 0),
            d(3600, 0),
            d(-1, 0),
            d(1, -1),
            d(0, 1_000_000_000),
            d(MAX_DURATION_SECONDS, 999_999_999),
            d(MAX_DURATION_SECONDS + 1, 0),
            d(i64::MAX, 0),
            d(i64::MIN, 0),
            d(1_000_000_000_000_000, 0),
        ];
        for b in [&rules.min_duration, &rules.max_duration].into_iter().flatten() {
            v.push(d(b.seconds, b.nanos));
            let nanos = i128::from(b.seconds) * 1_000_000_000 + i128::from(b.nanos);
            for n in [nanos - 1, nanos + 1] {
                let (s, ns) = (n.div_euclid(1_000_000_000), n.rem_euclid(1_000_000_000));
                v.push(d(s as i64, ns as i32));
            }
        }
        v
    }
}

/// One change to a request: the value of the field at `site`.
#[derive(Clone, Debug)]
struct Mutation {
    /// Fields from the request down, each with the list index it goes
    /// through (messages in repeated fields: the first item).
    site: Vec<(FieldDescriptor, Option<usize>)>,
    value: Value,
}

impl Mutation {
    fn label(&self) -> String {
        let path: Vec<String> = self
            .site
            .iter()
            .map(|(f, i)| match i {
                Some(i) => format!("{}[{i}]", f.name()),
                None => f.name().to_string(),
            })
            .collect();
        let shown = format!("{:?}", self.value);
        let shown = if shown.len() > 80 { format!("{}… ({} bytes)", &shown[..80], shown.len()) } else { shown };
        format!("{} = {shown}", path.join("."))
    }

    fn apply(&self, msg: &mut DynamicMessage, api: &Api) {
        set_at(msg, &self.site, self.value.clone(), api);
    }
}

fn set_at(msg: &mut DynamicMessage, site: &[(FieldDescriptor, Option<usize>)], value: Value, api: &Api) {
    let Some(((field, index), rest)) = site.split_first() else { return };
    if rest.is_empty() {
        msg.set_field(field, value);
        return;
    }
    let sub_desc = match field.kind() {
        Kind::Message(d) => d,
        _ => return,
    };
    if !msg.has_field(field) {
        let fresh = Value::Message(api.baseline(&sub_desc, 1));
        msg.set_field(field, if field.is_list() { Value::List(vec![fresh]) } else { fresh });
    }
    let slot = msg.get_field_mut(field);
    let sub = match (slot, index) {
        (Value::Message(m), None) => m,
        (Value::List(items), Some(i)) => {
            if items.is_empty() {
                items.push(Value::Message(api.baseline(&sub_desc, 1)));
            }
            match items.get_mut(*i) {
                Some(Value::Message(m)) => m,
                _ => return,
            }
        }
        _ => return,
    };
    set_at(sub, rest, value, api);
}

impl Api {
    /// Every single-field change worth trying in `desc` and below.
    fn mutations(
        &self,
        desc: &MessageDescriptor,
        prefix: Vec<(FieldDescriptor, Option<usize>)>,
        out: &mut Vec<Mutation>,
    ) {
        if prefix.len() > DEPTH {
            return;
        }
        for field in desc.fields() {
            let rules = self.rules(&field);
            let mut site = prefix.clone();
            site.push((field.clone(), None));
            let push = |out: &mut Vec<Mutation>, value: Value| out.push(Mutation { site: site.clone(), value });
            let kind = field.kind();
            if field.is_map() {
                let entry = kind.as_message().expect("map entry");
                let key_kind = entry.map_entry_key_field().kind();
                let value_kind = entry.map_entry_value_field().kind();
                let keys = self.scalar_values(&key_kind, rules.keys.as_deref().unwrap_or(&Default::default()));
                let values = self.scalar_values(&value_kind, rules.values.as_deref().unwrap_or(&Default::default()));
                let entry_of = |k: &Value, v: &Value| -> Option<(MapKey, Value)> {
                    match k {
                        Value::String(s) => Some((MapKey::String(s.clone()), v.clone())),
                        _ => None,
                    }
                };
                push(out, Value::Map(HashMap::new()));
                for k in &keys {
                    if let Some((k, v)) = entry_of(k, &Value::String("v".into())) {
                        push(out, Value::Map([(k, v)].into()));
                    }
                }
                for v in &values {
                    if let Some((k, v)) = entry_of(&Value::String("k".into()), v) {
                        push(out, Value::Map([(k, v)].into()));
                    }
                }
                if rules.max_len > 0 {
                    for n in [rules.max_len, rules.max_len + 1] {
                        let map =
                            (0..n).map(|i| (MapKey::String(format!("k{i}")), Value::String("v".into()))).collect();
                        push(out, Value::Map(map));
                    }
                }
                continue;
            }
            if field.is_list() {
                push(out, Value::List(Vec::new()));
                match &kind {
                    Kind::Message(sub) => {
                        let item = Value::Message(self.baseline(sub, 1));
                        if rules.max_len > 0 && rules.max_len <= 1000 {
                            for n in [rules.max_len, rules.max_len + 1] {
                                push(out, Value::List(vec![item.clone(); n as usize]));
                            }
                        }
                        if !is_wkt(sub) {
                            let mut deeper = prefix.clone();
                            deeper.push((field.clone(), Some(0)));
                            self.mutations(sub, deeper, out);
                        }
                    }
                    scalar => {
                        let item_rules = rules.items.as_deref().cloned().unwrap_or_default();
                        let items = self.scalar_values(scalar, &item_rules);
                        let items: Vec<Value> =
                            items.into_iter().filter(|v| !matches!(v, Value::String(s) if s.len() == HUGE)).collect();
                        for item in &items {
                            push(out, Value::List(vec![item.clone()]));
                        }
                        if rules.max_len > 0 {
                            let ok = items
                                .iter()
                                .find(|v| {
                                    int_of(v).is_some_and(|n| n == 1) || matches!(v, Value::String(s) if s == "a")
                                })
                                .cloned();
                            if let Some(ok) = ok {
                                for n in [rules.max_len, rules.max_len + 1] {
                                    push(out, Value::List(vec![ok.clone(); n as usize]));
                                }
                            }
                        }
                    }
                }
                continue;
            }
            match &kind {
                Kind::Message(sub) => {
                    let in_oneof = field.containing_oneof().is_some();
                    match sub.full_name() {
                        "google.protobuf.Timestamp" => self.timestamps().into_iter().for_each(|v| push(out, v)),
                        "google.protobuf.Duration" => self.durations(&rules).into_iter().for_each(|v| push(out, v)),
                        "google.protobuf.FieldMask" => {}
                        _ => {
                            if !in_oneof {
                                // Set to its own baseline (for optional ones).
                                push(out, Value::Message(self.baseline(sub, 1)));
                            }
                            self.mutations(sub, site.clone(), out);
                        }
                    }
                }
                scalar => {
                    for v in self.scalar_values(scalar, &rules) {
                        push(out, v);
                    }
                }
            }
        }
    }
}

fn is_wkt(desc: &MessageDescriptor) -> bool {
    desc.full_name().starts_with("google.protobuf.")
}

// ---- sending ------------------------------------------------------------------

struct Runner {
    channel: tonic::transport::Channel,
}

impl Runner {
    /// The status a request ends with (OK when it was served).
    async fn call(&self, method: &MethodDescriptor, request: &DynamicMessage, hello: &DynamicMessage) -> tonic::Status {
        let path: http::uri::PathAndQuery =
            format!("/{}/{}", method.parent_service().full_name(), method.name()).parse().expect("path");
        let mut grpc = tonic::client::Grpc::new(self.channel.clone()).max_decoding_message_size(64 << 20);
        if let Err(e) = grpc.ready().await {
            return tonic::Status::unavailable(format!("not ready: {e}"));
        }
        let body = Bytes::from(request.encode_to_vec());
        let ok = || tonic::Status::ok("");
        let answer = async {
            match (method.is_client_streaming(), method.is_server_streaming()) {
                (false, false) => match grpc.unary(tonic::Request::new(body), path, RawCodec).await {
                    Ok(_) => ok(),
                    Err(status) => status,
                },
                (false, true) => match grpc.server_streaming(tonic::Request::new(body), path, RawCodec).await {
                    Ok(_) => ok(),
                    Err(status) => status,
                },
                (true, _) => {
                    // The stream: a Hello first (the request itself when it is
                    // one), then the request, then a clean close.
                    let is_hello =
                        request.descriptor().get_field_by_name("hello").is_some_and(|f| request.has_field(&f));
                    let frames = if is_hello { vec![body] } else { vec![Bytes::from(hello.encode_to_vec()), body] };
                    let outbound = futures::stream::iter(frames);
                    match grpc.streaming(tonic::Request::new(outbound), path, RawCodec).await {
                        Err(status) => status,
                        Ok(response) => {
                            let mut inbound = response.into_inner();
                            loop {
                                match inbound.message().await {
                                    Ok(Some(_)) => {}
                                    Ok(None) => break ok(),
                                    Err(status) => break status,
                                }
                            }
                        }
                    }
                }
            }
        };
        tokio::time::timeout(WAIT, answer)
            .await
            .unwrap_or_else(|_| tonic::Status::deadline_exceeded("no answer in time"))
    }
}

/// What went wrong with one request, if anything.
fn judge(expected: &[Expect], status: &tonic::Status) -> Option<String> {
    if expected.is_empty() {
        if ACCEPTING.contains(&status.code()) {
            return None;
        }
        return Some(format!(
            "valid input refused: {:?} {:?} fields {:?}",
            status.code(),
            status.message(),
            violated_fields(status)
        ));
    }
    if status.code() != Code::InvalidArgument {
        return Some(format!(
            "expected INVALID_ARGUMENT naming one of {expected:?}, got {:?} {:?}",
            status.code(),
            status.message()
        ));
    }
    let named = violated_fields(status);
    if named.iter().any(|n| expected.iter().any(|e| e.matches(n))) {
        return None;
    }
    Some(format!("refused, but naming {named:?} instead of one of {expected:?}: {:?}", status.message()))
}

struct Case {
    method: MethodDescriptor,
    baseline: DynamicMessage,
    mutations: Vec<Mutation>,
}

async fn start(dir: &DataDir) -> (TestServer, Runner) {
    let server = TestServer::start_manual(dir).await;
    let runner = Runner { channel: server.channel().await };
    (server, runner)
}

fn cases(api: &Api) -> Vec<Case> {
    api.methods()
        .into_iter()
        .map(|method| {
            let input = method.input();
            let baseline = api.baseline(&input, 0);
            let mut mutations = Vec::new();
            api.mutations(&input, Vec::new(), &mut mutations);
            Case { method, baseline, mutations }
        })
        .collect()
}

async fn still_serves(server: &TestServer) {
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    let status = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.expect("health");
    assert_eq!(status.into_inner().status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    let mut q = server.queue().await;
    q.enqueue_job(tether_tests::job("after-rules", "x")).await.expect("enqueue after the probes");
}

#[tokio::test]
async fn every_field_of_every_request_meets_its_documented_rules() {
    let api = Api::load();
    let dir = DataDir::new();
    let (server, runner) = start(&dir).await;
    let connect = api.pool.get_message_by_name("tether.v1.ConnectRequest").expect("ConnectRequest");
    let hello = api.baseline(&connect, 0);
    let cases = cases(&api);
    let methods: Vec<&str> = cases.iter().map(|c| c.method.name()).collect();
    for expected in ["EnqueueJob", "Connect", "WatchQueue", "UpdateAgentPool"] {
        assert!(methods.contains(&expected), "{expected} is enumerated: {methods:?}");
    }
    let mut failures = Vec::new();
    let mut probes = 0;
    for case in &cases {
        let mut base_violations = Vec::new();
        api.violations(&case.baseline, "", &mut base_violations);
        assert!(base_violations.is_empty(), "{}: baseline breaks {base_violations:?}", case.method.name());
        let status = runner.call(&case.method, &case.baseline, &hello).await;
        if let Some(problem) = judge(&[], &status) {
            failures.push(format!("{} baseline: {problem}", case.method.name()));
        }
        for mutation in &case.mutations {
            let mut request = case.baseline.clone();
            mutation.apply(&mut request, &api);
            let mut expected = Vec::new();
            api.violations(&request, "", &mut expected);
            let status = runner.call(&case.method, &request, &hello).await;
            probes += 1;
            if let Some(problem) = judge(&expected, &status) {
                failures.push(format!("{} {}: {problem}", case.method.name(), mutation.label()));
            }
        }
    }
    eprintln!("{probes} probes over {} methods", cases.len());
    assert!(probes > 1000, "only {probes} probes");
    assert!(failures.is_empty(), "{} of {probes} probes failed:\n{}", failures.len(), failures.join("\n"));
    still_serves(&server).await;
}

#[test]
fn combined_changes_get_the_verdict_of_the_rules() {
    // Several changes at once (a property over random combinations): the
    // request is refused naming one of the broken fields exactly when any
    // field breaks its rules.
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let api = Api::load();
    let dir = DataDir::new();
    let (server, runner) = runtime.block_on(start(&dir));
    let connect = api.pool.get_message_by_name("tether.v1.ConnectRequest").expect("ConnectRequest");
    let hello = api.baseline(&connect, 0);
    let cases: Vec<Case> = cases(&api).into_iter().filter(|c| !c.mutations.is_empty()).collect();
    let strategy =
        (0..cases.len()).prop_flat_map(|c| (Just(c), proptest::collection::vec(any::<prop::sample::Index>(), 1..4)));
    // A fixed seed: the same 300 combinations on every run.
    let config = Config { cases: 300, failure_persistence: None, ..Config::default() };
    let rng = proptest::test_runner::TestRng::from_seed(proptest::test_runner::RngAlgorithm::ChaCha, &[7; 32]);
    let mut runner_cfg = TestRunner::new_with_rng(config, rng);
    let result = runner_cfg.run(&strategy, |(c, picks)| {
        let case = &cases[c];
        let mut request = case.baseline.clone();
        let mut labels = Vec::new();
        for pick in picks {
            let m = pick.get(&case.mutations);
            m.apply(&mut request, &api);
            labels.push(m.label());
        }
        let mut expected = Vec::new();
        api.violations(&request, "", &mut expected);
        let status = runtime.block_on(runner.call(&case.method, &request, &hello));
        if let Some(problem) = judge(&expected, &status) {
            return Err(TestCaseError::fail(format!("{} {labels:?}: {problem}", case.method.name())));
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    runtime.block_on(still_serves(&server));
    drop(server);
}

#[test]
fn the_rules_are_read_from_the_descriptor_set() {
    let api = Api::load();
    let enqueue = api.pool.get_message_by_name("tether.v1.EnqueueJobRequest").expect("EnqueueJobRequest");
    let queue = api.rules(&enqueue.get_field_by_name("queue").expect("queue"));
    assert!(queue.required && queue.name && queue.max_len == 128, "{queue:?}");
    let timeout = api.rules(&enqueue.get_field_by_name("timeout").expect("timeout"));
    assert_eq!(timeout.max_duration.map(|d| d.seconds), Some(30 * 24 * 3600));
    // A field the server fills in.
    let pool = api.pool.get_message_by_name("tether.v1.AgentPool").expect("AgentPool");
    assert!(api.rules(&pool.get_field_by_name("create_time").expect("create_time")).output_only);
    // The validator agrees with itself on the baseline and a broken value.
    let mut request = api.baseline(&enqueue, 0);
    let mut found = Vec::new();
    api.violations(&request, "", &mut found);
    assert!(found.is_empty(), "{found:?}");
    request.set_field_by_name("queue", Value::String("a b".into()));
    api.violations(&request, "", &mut found);
    assert_eq!(found, vec![Expect::Exact("queue".into())]);
}
