//! Realistic JSON for each endpoint, in the shapes public clients describe (docs/upstream.md).
//!
//! Everything is derived from the account id (and the chat id, the page, …) with a small
//! deterministic generator, anchored at a fixed date, so the same request for the same
//! account always gets the same answer and lists page consistently.

use serde_json::{json, Map, Value};

use super::query::Query;

/// The sandbox's "now" for generated history: 2025-01-15T12:00:00Z.
const ANCHOR_SECS: i64 = 1_736_942_400;
const DAY: i64 = 86_400;
const MAX_PAGE: u64 = 100;

const CREATOR_NAMES: [&str; 10] = [
    "Luna", "Mia", "Ava", "Chloe", "Sofia", "Ivy", "Nora", "Ruby", "Jade", "Stella",
];
const FAN_NAMES: [&str; 16] = [
    "Alex", "Jordan", "Taylor", "Sam", "Chris", "Morgan", "Jamie", "Riley", "Casey", "Drew", "Max",
    "Robin", "Kai", "Noah", "Leo", "Eli",
];
const FAN_LINES: [&str; 8] = [
    "hey, how was your day?",
    "loved the new set!",
    "are you doing a live stream this week?",
    "haha that's amazing",
    "good morning ☀️",
    "can't wait for the next one",
    "thanks for the reply 😊",
    "what camera do you use?",
];
const CREATOR_LINES: [&str; 8] = [
    "Thank you so much babe 💕",
    "New set dropping tonight, stay tuned!",
    "Good morning! Hope you have a great day",
    "Going live on Friday at 8pm 🎥",
    "Haha you're the best",
    "Check your messages, I sent you something special",
    "Aww thank you for the support!",
    "Sure! Ask me anything 😉",
];

/// A small, fast, deterministic generator (splitmix64).
struct Rng(u64);

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    fn new(parts: &[u64]) -> Self {
        Rng(parts.iter().fold(0x2545_F491_4F6C_DD1D, |s, p| mix(s ^ p)))
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn rfc3339(secs: i64) -> String {
    chrono::DateTime::from_timestamp(secs, 0)
        .map(|d| d.to_rfc3339())
        .unwrap_or_default()
}

fn money(cents: u64) -> Value {
    json!(cents as f64 / 100.0)
}

fn secs(t: u64) -> i64 {
    i64::try_from(t).unwrap_or(i64::MAX)
}

/// What is fixed about one account.
pub(crate) struct Profile {
    seed: u64,
    user_id: String,
    id: Value,
    name: String,
    subscribers: u64,
    expired_fans: u64,
    chats: u64,
    posts: u64,
    photos: u64,
    videos: u64,
    price_cents: u64,
    joined: i64,
}

impl Profile {
    pub(crate) fn new(user_id: &str) -> Self {
        let seed = user_id.parse::<u64>().unwrap_or_else(|_| fnv(user_id));
        let mut rng = Rng::new(&[seed, 1]);
        let name = format!(
            "{} {}.",
            rng.pick(&CREATOR_NAMES),
            char::from(b'A' + rng.below(26) as u8)
        );
        let subscribers = rng.between(40, 4_000);
        let photos = rng.between(50, 2_000);
        let videos = rng.between(10, 400);
        Profile {
            seed,
            user_id: user_id.to_owned(),
            id: user_id
                .parse::<u64>()
                .map_or_else(|_| json!(user_id), |n| json!(n)),
            name,
            subscribers,
            expired_fans: rng.between(10, 1_500),
            chats: subscribers.min(rng.between(20, 80)),
            posts: rng.between(30, 900),
            photos,
            videos,
            price_cents: rng.pick(&[0, 499, 999, 1499, 1999]),
            joined: ANCHOR_SECS - secs(rng.between(200, 1_500)) * DAY,
        }
    }

    fn fan_id(&self, index: u64) -> u64 {
        // 104_729 is prime and does not divide 700_000_000, so ids are distinct per account.
        200_000_000 + ((self.seed % 1_000_003) * 7 + index * 104_729) % 700_000_000
    }

    fn creator_id(&self) -> Value {
        self.id.clone()
    }

    /// `GET users/me`.
    pub(crate) fn me(&self) -> Value {
        json!({
            "view": "me",
            "id": self.id,
            "username": format!("u{}", self.user_id),
            "name": self.name,
            "isAuth": true,
            "email": format!("u{}@sandbox.invalid", self.user_id),
            "isEmailChecked": true,
            "avatar": format!("https://sandbox.invalid/files/{}/avatar.jpg", self.user_id),
            "header": format!("https://sandbox.invalid/files/{}/header.jpg", self.user_id),
            "about": "Welcome to my page 💕 New content every week.",
            "isVerified": true,
            "isPerformer": true,
            "canEarn": true,
            "subscribePrice": money(self.price_cents),
            "currentSubscribePrice": money(self.price_cents),
            "subscribersCount": self.subscribers,
            "postsCount": self.posts,
            "photosCount": self.photos,
            "videosCount": self.videos,
            "audiosCount": 0,
            "mediasCount": self.photos + self.videos,
            "favoritesCount": self.posts * 7,
            "chatMessagesCount": self.chats * 40,
            "creditBalance": 0,
            "hasNewAlerts": false,
            "joinDate": rfc3339(self.joined),
            "lastSeen": rfc3339(ANCHOR_SECS),
        })
    }

    /// A fan as `subscriptions/subscribers` (and `chats` without `skip_users`) show them.
    fn fan(&self, index: u64, active: bool) -> Value {
        let id = self.fan_id(index);
        let mut rng = Rng::new(&[self.seed, 2, id]);
        let name = rng.pick(&FAN_NAMES);
        let username = if rng.chance(60) {
            format!("u{id}")
        } else {
            format!("{}{}", name.to_lowercase(), rng.between(1, 99))
        };
        let months = rng.between(1, 24);
        let subscribed_at = ANCHOR_SECS - secs(months) * 30 * DAY - secs(rng.below(30)) * DAY;
        let renewed_at = ANCHOR_SECS - secs(rng.below(30)) * DAY;
        let expires_at = if active {
            renewed_at + 30 * DAY
        } else {
            ANCHOR_SECS - secs(rng.between(1, 120)) * DAY
        };
        let price = self.price_cents;
        let subscribes = price * months;
        let tips = if rng.chance(40) {
            rng.between(5, 200) * 100
        } else {
            0
        };
        let messages = if rng.chance(50) {
            rng.between(1, 30) * 499
        } else {
            0
        };
        let posts = if rng.chance(20) {
            rng.between(1, 10) * 999
        } else {
            0
        };
        let duration = format!("{months} month{}", if months == 1 { "" } else { "s" });
        let subscribed_on_data = json!({
            "price": money(price),
            "newPrice": money(price),
            "regularPrice": money(price),
            "subscribePrice": money(price),
            "discountPercent": 0,
            "discountPeriod": 0,
            "subscribeAt": rfc3339(subscribed_at),
            "expiredAt": rfc3339(expires_at),
            "renewedAt": rfc3339(renewed_at),
            "discountFinishedAt": null,
            "discountStartedAt": null,
            "status": if active { Value::Null } else { json!("Expired") },
            "isMuted": false,
            "unsubscribeReason": "",
            "duration": duration,
            "tipsSumm": money(tips),
            "subscribesSumm": money(subscribes),
            "messagesSumm": money(messages),
            "postsSumm": money(posts),
            "streamsSumm": 0,
            "totalSumm": money(tips + subscribes + messages + posts),
            "lastActivity": rfc3339(renewed_at),
            "recentlyExpired": !active && expires_at > ANCHOR_SECS - 7 * DAY,
            "subscribes": [{
                "id": mix(id ^ self.seed) % 1_000_000_000,
                "userId": id,
                "subscriberId": self.id,
                "date": rfc3339(renewed_at),
                "duration": 30,
                "startDate": rfc3339(renewed_at),
                "expireDate": rfc3339(renewed_at + 30 * DAY),
                "cancelDate": null,
                "price": money(price),
                "regularPrice": money(price),
                "discount": 0,
                "action": "subscribe",
                "type": "regular",
                "isCurrent": active,
            }],
        });
        json!({
            "view": "s",
            "id": id,
            "name": name,
            "username": username,
            "avatar": if rng.chance(70) { json!(format!("https://sandbox.invalid/files/{id}/avatar.jpg")) } else { Value::Null },
            "isVerified": false,
            "canEarn": false,
            "subscribedBy": false,
            "subscribedOn": active,
            "subscribedOnExpiredNow": !active,
            "subscribedOnDuration": duration,
            "lastSeen": rfc3339(ANCHOR_SECS - secs(rng.below(14 * DAY as u64))),
            "subscribedOnData": subscribed_on_data,
        })
    }

    /// `GET subscriptions/subscribers?type=active|expired|all&limit&offset`: a JSON array.
    /// `None` when `type` is missing or unknown.
    pub(crate) fn subscribers(&self, query: &Query) -> Option<Value> {
        let (first, total) = match query.get("type")? {
            "active" => (0, self.subscribers),
            "expired" => (self.subscribers, self.expired_fans),
            "all" => (0, self.subscribers + self.expired_fans),
            _ => return None,
        };
        let limit = query.limit(10, MAX_PAGE);
        let offset = query.uint("offset").unwrap_or(0).min(total);
        let end = (offset + limit).min(total);
        Some(Value::Array(
            (offset..end)
                .map(|i| self.fan(first + i, first + i < self.subscribers))
                .collect(),
        ))
    }

    /// `GET chats?limit&offset&order=recent&skip_users=all`.
    pub(crate) fn chats(&self, query: &Query) -> Value {
        // The most recent conversation first.
        let mut chats: Vec<(u64, Conversation)> = (0..self.chats)
            .map(|i| (i, Conversation::new(self, self.fan_id(i))))
            .collect();
        chats.sort_by(|a, b| b.1.newest.cmp(&a.1.newest).then(a.0.cmp(&b.0)));
        let limit = query.limit(10, MAX_PAGE);
        let offset = query.uint("offset").unwrap_or(0).min(self.chats);
        let skip_users = query.get("skip_users") == Some("all");
        let list: Vec<Value> = chats
            .iter()
            .skip(offset as usize)
            .take(limit as usize)
            .map(|(index, chat)| {
                let mut rng = Rng::new(&[self.seed, 3, chat.with_user]);
                let last = chat.count - 1;
                let unread = if rng.chance(40) { rng.between(1, 5) } else { 0 };
                let with_user = if skip_users {
                    json!({"id": chat.with_user, "_view": "s"})
                } else {
                    self.fan(*index, true)
                };
                json!({
                    "withUser": with_user,
                    "lastMessage": chat.message(self, last),
                    "lastReadMessageId": chat.id_of(last.saturating_sub(unread)),
                    "hasPurchasedFeed": false,
                    "countPinnedMessages": 0,
                    "unreadMessagesCount": unread,
                    "hasUnreadTips": false,
                    "isMutedNotifications": false,
                    "canGoToProfile": true,
                    "canSendMessage": true,
                    "canNotSendReason": false,
                })
            })
            .collect();
        let next = offset + list.len() as u64;
        json!({
            "list": list,
            "hasMore": next < self.chats,
            "nextOffset": next,
        })
    }

    /// `GET chats/{id}/messages?limit&order=desc&id=<cursor>`.
    pub(crate) fn messages(&self, chat_id: u64, query: &Query) -> Value {
        let chat = Conversation::new(self, chat_id);
        let limit = query.limit(10, MAX_PAGE);
        let ascending = query.get("order") == Some("asc");
        let cursor = query.uint("id");
        let indexes: Vec<u64> = if ascending {
            // Messages after the cursor, oldest first.
            let from = match cursor {
                Some(c) if c >= chat.base_id => {
                    ((c - chat.base_id) / MESSAGE_ID_STEP + 1).min(chat.count)
                }
                _ => 0,
            };
            (from..chat.count).collect()
        } else {
            // Messages before the cursor, newest first.
            let until = match cursor {
                Some(c) if c <= chat.base_id => 0,
                Some(c) => ((c - chat.base_id).div_ceil(MESSAGE_ID_STEP)).min(chat.count),
                None => chat.count,
            };
            (0..until).rev().collect()
        };
        let has_more = indexes.len() as u64 > limit;
        let list: Vec<Value> = indexes
            .into_iter()
            .take(limit as usize)
            .map(|k| chat.message(self, k))
            .collect();
        json!({"list": list, "hasMore": has_more})
    }

    /// `POST chats/{id}/messages`: the message just sent.
    pub(crate) fn sent_message(
        &self,
        id: u64,
        request: &Map<String, Value>,
        now_secs: i64,
    ) -> Value {
        let text = request.get("text").and_then(Value::as_str).unwrap_or("");
        let price = request.get("price").and_then(Value::as_f64).unwrap_or(0.0);
        let locked = request
            .get("lockedText")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let media = request
            .get("mediaFiles")
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        let previews = request
            .get("previews")
            .cloned()
            .unwrap_or_else(|| json!([]));
        message_json(MessageFields {
            id,
            text,
            price: json!(price),
            is_free: price == 0.0,
            locked_text: locked,
            media_count: media as u64,
            previews,
            from_user: self.creator_id(),
            created: now_secs,
            is_opened: false,
            is_new: false,
        })
    }

    fn transactions(&self) -> Vec<Transaction> {
        let mut rng = Rng::new(&[self.seed, 4]);
        let count = rng.between(40, 200);
        let gap = secs(rng.between(2, 12)) * 3_600;
        (0..count).map(|i| Transaction::new(self, i, gap)).collect()
    }

    /// `GET payouts/transactions?limit&marker&startDate`.
    pub(crate) fn transactions_page(&self, query: &Query) -> Value {
        let limit = query.limit(10, MAX_PAGE) as usize;
        let marker = query.uint("marker").map(secs);
        let start = query.date("startDate");
        let eligible: Vec<Transaction> = self
            .transactions()
            .into_iter()
            .filter(|t| marker.is_none_or(|m| t.created < m))
            .take_while(|t| start.is_none_or(|s| t.created >= s))
            .collect();
        let has_more = eligible.len() > limit;
        let page = &eligible[..eligible.len().min(limit)];
        json!({
            "list": page.iter().map(Transaction::json).collect::<Vec<_>>(),
            "hasMore": has_more,
            "nextMarker": if has_more { page.last().map(|t| json!(t.created)) } else { None },
        })
    }

    /// `GET payouts/stats?startDate&endDate`: earnings totals over the transactions.
    pub(crate) fn stats(&self, query: &Query) -> Value {
        let start = query.date("startDate");
        let end = query.date("endDate");
        let mut totals: [Totals; 4] = Default::default();
        for t in self.transactions() {
            if start.is_some_and(|s| t.created < s) || end.is_some_and(|e| t.created > e) {
                continue;
            }
            totals[t.kind as usize].add(&t);
        }
        let mut all = Totals::default();
        for t in &totals {
            all.gross += t.gross;
            all.fee += t.fee;
            all.count += t.count;
        }
        json!({
            "isAvailable": true,
            "hasStats": all.count > 0,
            "currency": "USD",
            "startDate": start.map(rfc3339),
            "endDate": end.map(rfc3339),
            "total": all.json(),
            "subscribes": totals[Kind::Subscription as usize].json(),
            "tips": totals[Kind::Tip as usize].json(),
            "messages": totals[Kind::Message as usize].json(),
            "posts": totals[Kind::Post as usize].json(),
            "stream": Totals::default().json(),
            "referral": Totals::default().json(),
        })
    }

    /// `GET payouts/balances`.
    pub(crate) fn balances(&self) -> Value {
        let mut rng = Rng::new(&[self.seed, 5]);
        let current = rng.below(500_000);
        let pending: u64 = self
            .transactions()
            .iter()
            .filter(|t| t.pending)
            .map(|t| t.gross - t.fee)
            .sum();
        let requests = self.payout_requests(false);
        json!({
            "minPayoutSumm": 20,
            "maxPayoutSumm": 50_000,
            "minInternalPayoutSumm": 10,
            "currentBalance": money(current),
            "pendingBalance": money(pending),
            "creditBalance": 0,
            "currency": "USD",
            "payoutAvailable": current >= 2_000,
            "payoutPending": requests.iter().any(|r| r.state == "pending"),
            "canRequestManualPayout": current >= 2_000,
            "payoutFrequency": "weekly",
        })
    }

    fn payout_requests(&self, referral: bool) -> Vec<PayoutRequest> {
        let salt = if referral { 7 } else { 6 };
        let mut rng = Rng::new(&[self.seed, salt]);
        let count = if referral {
            rng.below(6)
        } else {
            rng.between(3, 30)
        };
        (0..count)
            .map(|i| {
                let mut rng = Rng::new(&[self.seed, salt, i]);
                let created =
                    ANCHOR_SECS - (secs(i) + 1) * 7 * DAY + secs(rng.below(DAY as u64 / 2));
                let state = if i == 0 && rng.chance(50) {
                    "pending"
                } else if rng.chance(8) {
                    "canceled"
                } else {
                    "done"
                };
                PayoutRequest {
                    id: 10_000_000 + rng.below(80_000_000),
                    amount: if referral {
                        rng.between(500, 20_000)
                    } else {
                        rng.between(2_000, 300_000)
                    },
                    created,
                    state,
                }
            })
            .collect()
    }

    /// `GET payouts/requests` (`referral: false`) or `payouts/requests/referral`, with
    /// `marker` (Unix seconds, exclusive), `startDate`, `endDate` and `limit`.
    pub(crate) fn payout_requests_page(&self, referral: bool, query: &Query) -> Value {
        let limit = query.limit(10, MAX_PAGE) as usize;
        let marker = query.uint("marker").map(secs);
        let start = query.date("startDate");
        let end = query.date("endDate");
        let eligible: Vec<PayoutRequest> = self
            .payout_requests(referral)
            .into_iter()
            .filter(|r| marker.is_none_or(|m| r.created < m))
            .filter(|r| end.is_none_or(|e| r.created <= e))
            .take_while(|r| start.is_none_or(|s| r.created >= s))
            .collect();
        let has_more = eligible.len() > limit;
        let page = &eligible[..eligible.len().min(limit)];
        json!({
            "list": page.iter().map(|r| r.json(referral)).collect::<Vec<_>>(),
            "marker": if has_more { page.last().map(|r| json!(r.created)) } else { None },
        })
    }
}

const MESSAGE_ID_STEP: u64 = 17;

/// One conversation's history: ids `base_id + k·17` for `k` in `0..count`, oldest first.
struct Conversation {
    with_user: u64,
    count: u64,
    base_id: u64,
    newest: i64,
    gap: i64,
}

impl Conversation {
    fn new(profile: &Profile, with_user: u64) -> Self {
        let mut rng = Rng::new(&[profile.seed, 8, with_user]);
        Conversation {
            with_user,
            count: rng.between(5, 120),
            // Below `MISSING_ID_FROM`: every listed message can be deleted.
            base_id: 1_000_000_000 + rng.below(5_000_000_000),
            newest: ANCHOR_SECS - secs(rng.below(30 * DAY as u64)),
            gap: secs(rng.between(120, 7_200)),
        }
    }

    fn id_of(&self, k: u64) -> u64 {
        self.base_id + k * MESSAGE_ID_STEP
    }

    fn message(&self, profile: &Profile, k: u64) -> Value {
        let mut rng = Rng::new(&[profile.seed, 9, self.with_user, k]);
        let from_creator = rng.chance(50);
        let paid = from_creator && rng.chance(15);
        let price = if paid {
            rng.pick(&[399_u64, 500, 999, 1_499, 2_500])
        } else {
            0
        };
        let text = if from_creator {
            rng.pick(&CREATOR_LINES)
        } else {
            rng.pick(&FAN_LINES)
        };
        let media_count = if paid { rng.between(1, 6) } else { 0 };
        let newest_k = self.count - 1;
        message_json(MessageFields {
            id: self.id_of(k),
            text,
            price: money(price),
            is_free: !paid,
            locked_text: false,
            media_count,
            previews: json!([]),
            from_user: if from_creator {
                profile.creator_id()
            } else {
                json!(self.with_user)
            },
            created: self.newest - secs(newest_k - k) * self.gap,
            is_opened: k + 3 < newest_k || rng.chance(50),
            is_new: k == newest_k && !from_creator,
        })
    }
}

struct MessageFields<'a> {
    id: u64,
    text: &'a str,
    price: Value,
    is_free: bool,
    locked_text: bool,
    media_count: u64,
    previews: Value,
    from_user: Value,
    created: i64,
    is_opened: bool,
    is_new: bool,
}

fn message_json(m: MessageFields<'_>) -> Value {
    json!({
        "responseType": "message",
        "text": m.text,
        "giphyId": null,
        "lockedText": m.locked_text,
        "isFree": m.is_free,
        "price": m.price,
        "isMediaReady": true,
        "mediaCount": m.media_count,
        "media": [],
        "previews": m.previews,
        "isTip": false,
        "isReportedByMe": false,
        "isCouplePeopleMedia": false,
        "queueId": null,
        "fromUser": {"id": m.from_user, "_view": "s"},
        "isFromQueue": false,
        "id": m.id,
        "isOpened": m.is_opened,
        "isNew": m.is_new,
        "createdAt": rfc3339(m.created),
        "changedAt": rfc3339(m.created),
        "cancelSeconds": 0,
        "isLiked": false,
        "canPurchase": false,
        "canPurchaseReason": "free",
        "canReport": true,
        "canBePinned": true,
        "isPinned": false,
    })
}

#[derive(Clone, Copy)]
enum Kind {
    Subscription = 0,
    Tip = 1,
    Message = 2,
    Post = 3,
}

struct Transaction {
    id: String,
    kind: Kind,
    gross: u64,
    fee: u64,
    created: i64,
    pending: bool,
    user: u64,
    user_name: &'static str,
}

impl Transaction {
    /// Transaction `i`, newest first: strictly older as `i` grows (jitter < half a gap).
    fn new(profile: &Profile, i: u64, gap: i64) -> Self {
        let mut rng = Rng::new(&[profile.seed, 10, i]);
        let roll = rng.below(100);
        let (kind, gross) = match roll {
            0..=39 => (Kind::Subscription, rng.pick(&[499_u64, 999, 1_499, 1_999])),
            40..=64 => (Kind::Tip, rng.between(1, 100) * 100),
            65..=89 => (Kind::Message, rng.pick(&[399_u64, 500, 999, 1_499, 2_500])),
            _ => (Kind::Post, rng.pick(&[500_u64, 999, 1_999])),
        };
        let fan = rng.below(profile.subscribers);
        Transaction {
            id: format!("{:016x}", rng.next()),
            kind,
            gross,
            fee: (gross * 20).div_ceil(100),
            created: ANCHOR_SECS - secs(i) * gap - secs(rng.below((gap / 2).max(1) as u64)),
            pending: i < 3,
            user: profile.fan_id(fan),
            user_name: rng.pick(&FAN_NAMES),
        }
    }

    fn json(&self) -> Value {
        let description = match self.kind {
            Kind::Subscription => format!("Subscription from {}", self.user_name),
            Kind::Tip => format!("Tip from {}", self.user_name),
            Kind::Message => format!("Payment for message from {}", self.user_name),
            Kind::Post => format!("Payment for post from {}", self.user_name),
        };
        json!({
            "id": self.id,
            "amount": money(self.gross),
            "fee": money(self.fee),
            "net": money(self.gross - self.fee),
            "vatAmount": 0,
            "taxAmount": 0,
            "currency": "USD",
            "description": description,
            "status": if self.pending { "pending" } else { "done" },
            "createdAt": rfc3339(self.created),
            "user": {"id": self.user, "_view": "s"},
        })
    }
}

#[derive(Default)]
struct Totals {
    gross: u64,
    fee: u64,
    count: u64,
}

impl Totals {
    fn add(&mut self, t: &Transaction) {
        self.gross += t.gross;
        self.fee += t.fee;
        self.count += 1;
    }

    fn json(&self) -> Value {
        json!({
            "gross": money(self.gross),
            "net": money(self.gross - self.fee),
            "fee": money(self.fee),
            "count": self.count,
        })
    }
}

struct PayoutRequest {
    id: u64,
    amount: u64,
    created: i64,
    state: &'static str,
}

impl PayoutRequest {
    fn json(&self, referral: bool) -> Value {
        let invoice = (self.state == "done").then(|| {
            format!(
                "{}{}-{}",
                if referral { "REF" } else { "INV" },
                &rfc3339(self.created)[..4],
                self.id
            )
        });
        json!({
            "id": self.id,
            "amount": money(self.amount),
            "currency": "USD",
            "createdAt": rfc3339(self.created),
            "invoiceId": invoice,
            "state": self.state,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(raw: &str) -> Query {
        Query::parse(Some(raw))
    }

    #[test]
    fn same_account_same_answers_and_others_differ() {
        let a = Profile::new("123456789");
        assert_eq!(a.me(), Profile::new("123456789").me());
        assert_ne!(a.me()["name"], Value::Null);
        assert_ne!(a.balances(), Profile::new("987654321").balances());
    }

    #[test]
    fn chat_pages_do_not_overlap_and_cover_every_chat() {
        let p = Profile::new("111222333");
        let mut seen = std::collections::HashSet::new();
        let mut offset = 0;
        loop {
            let page = p.chats(&q(&format!("limit=7&offset={offset}&skip_users=all")));
            for chat in page["list"].as_array().unwrap() {
                assert!(seen.insert(chat["withUser"]["id"].as_u64().unwrap()));
            }
            if !page["hasMore"].as_bool().unwrap() {
                break;
            }
            offset = page["nextOffset"].as_u64().unwrap();
        }
        assert_eq!(seen.len() as u64, p.chats);
    }

    #[test]
    fn message_cursor_walks_back_without_gaps() {
        let p = Profile::new("5");
        let chat = p.fan_id(0);
        let conv = Conversation::new(&p, chat);
        let mut ids = Vec::new();
        let mut cursor = String::new();
        loop {
            let page = p.messages(chat, &q(&format!("limit=9&order=desc{cursor}")));
            let list = page["list"].as_array().unwrap();
            ids.extend(list.iter().map(|m| m["id"].as_u64().unwrap()));
            if !page["hasMore"].as_bool().unwrap() {
                break;
            }
            cursor = format!("&id={}", ids.last().unwrap());
        }
        let expected: Vec<u64> = (0..conv.count).rev().map(|k| conv.id_of(k)).collect();
        assert_eq!(ids, expected);
        let asc = p.messages(chat, &q(&format!("order=asc&id={}&limit=2", conv.id_of(0))));
        assert_eq!(asc["list"][0]["id"].as_u64(), Some(conv.id_of(1)));
    }

    #[test]
    fn transactions_page_by_marker_and_stats_add_up() {
        let p = Profile::new("42");
        let all = p.transactions();
        assert!(all.windows(2).all(|w| w[0].created > w[1].created));
        let first = p.transactions_page(&q("limit=5"));
        assert_eq!(first["list"].as_array().unwrap().len(), 5);
        let marker = first["nextMarker"].as_i64().unwrap();
        let second = p.transactions_page(&q(&format!("limit=5&marker={marker}")));
        assert_eq!(second["list"][0]["id"], json!(all[5].id));
        let stats = p.stats(&Query::default());
        assert_eq!(stats["total"]["count"].as_u64(), Some(all.len() as u64));
        let gross: u64 = all.iter().map(|t| t.gross).sum();
        assert_eq!(stats["total"]["gross"], money(gross));
    }

    #[test]
    fn subscribers_need_a_known_type_and_honour_paging() {
        let p = Profile::new("77");
        assert!(p.subscribers(&Query::default()).is_none());
        assert!(p.subscribers(&q("type=bogus")).is_none());
        let page = p.subscribers(&q("type=active&limit=3&offset=2")).unwrap();
        let page = page.as_array().unwrap();
        assert_eq!(page.len(), 3);
        assert_eq!(page[0]["id"].as_u64(), Some(p.fan_id(2)));
        assert_eq!(
            page[0]["subscribedOnData"]["subscribes"][0]["isCurrent"],
            true
        );
        let expired = p.subscribers(&q("type=expired&limit=1")).unwrap();
        assert_eq!(expired[0]["subscribedOn"], false);
    }
}
