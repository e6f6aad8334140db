//! The commands of `ClientFrame`, each turned into a reply body or a [`CommandError`] with
//! the documented code. They act on the session core and reach the rest of the node only
//! through its [`Context`](super::context::Context): the hub, the channel operations, the
//! verifier and the clock.

use super::{core::SessionCore, subscriptions::Subscription};
use crate::{
    auth::AuthError,
    broker::PresenceChange,
    broker::PublishRequest,
    channel::ChannelName,
    channels::{Limit, Publisher, ReadPermit, Started},
    config::NamespaceOptions,
    error::{CommandError, bounds},
    hub::Subscriber,
    metrics,
};
use broker_proto::{
    CloseCode, ErrorCode,
    v1::{
        Connect, ConnectResult, HistoryRequest, HistoryResult, PresenceRequest, PresenceResult,
        Publish, PublishResult, Subscribe, SubscribeResult, Unsubscribe, UnsubscribeResult,
        client_frame::Command, server_frame::Body,
    },
};

impl SessionCore {
    /// Runs one command; `Ok(None)` means its answer comes later (blob chunks, an RPC
    /// result), made off this task and tagged with `id`.
    pub(super) async fn dispatch(
        &mut self,
        id: u32,
        command: Option<Command>,
    ) -> Result<Option<Body>, CommandError> {
        let Some(command) = command else {
            metrics::command("unknown");
            return Err(CommandError::bad_request("frame carries no known command"));
        };
        match command {
            Command::Connect(c) => {
                metrics::command("connect");
                if c.token.is_empty() || !self.ctx.verifier.enabled() {
                    self.connect(c).map(Some)
                } else {
                    self.connect_with_token(c).await.map(Some)
                }
            }
            Command::Subscribe(s) => {
                metrics::command("subscribe");
                self.subscribe(s).await.map(Some)
            }
            Command::Unsubscribe(u) => {
                metrics::command("unsubscribe");
                self.unsubscribe(u).await.map(Some)
            }
            Command::Publish(p) => {
                metrics::command("publish");
                self.publish(id, p).await
            }
            Command::Presence(p) => {
                metrics::command("presence");
                self.presence(p).await.map(Some)
            }
            Command::History(h) => {
                metrics::command("history");
                self.history(h).await.map(Some)
            }
            Command::Ping(_) => {
                metrics::command("ping");
                Ok(Some(Body::Pong(Default::default())))
            }
            Command::BlobPut(put) => {
                metrics::command("blob_put");
                self.blob_put(put).await.map(Some)
            }
            Command::BlobGet(get) => {
                metrics::command("blob_get");
                self.blob_get(id, get).await.map(|()| None)
            }
            Command::Rpc(call) => {
                metrics::command("rpc");
                self.rpc(id, call).map(|()| None)
            }
        }
    }

    /// Validates a channel name and checks that this client may publish there (and so
    /// upload images for it).
    pub(super) fn authorize_publish(
        &self,
        name: &str,
    ) -> Result<(ChannelName, NamespaceOptions), CommandError> {
        let (channel, options) = self.authorize(name)?;
        if !options.allow_publish {
            return Err(CommandError::permission_denied(
                "clients may not publish in this namespace",
            ));
        }
        Ok((channel, options))
    }

    /// Validates a channel name and checks that this client may use it: a token where
    /// the namespace needs one, `#user` channels, the token's grants and private
    /// namespaces (a subscription made with a subscription token opens its channel).
    pub(super) fn authorize(
        &self,
        name: &str,
    ) -> Result<(ChannelName, NamespaceOptions), CommandError> {
        let (channel, options) = self.authorize_user(name)?;
        if !self.subscriptions.granted(channel.as_str()) && !self.token_allows(&channel, &options) {
            return Err(CommandError::permission_denied(
                "this channel needs a grant or a subscription token",
            ));
        }
        Ok((channel, options))
    }

    /// The checks of [`Self::authorize`] that no grant or subscription token lifts.
    fn authorize_user(&self, name: &str) -> Result<(ChannelName, NamespaceOptions), CommandError> {
        let (channel, options) = self.ctx.channels.resolve(name)?;
        if self.ctx.verifier.enabled() && self.identity.is_none() && !options.allow_anonymous {
            return Err(CommandError::new(
                ErrorCode::Unauthorized,
                "this namespace needs a token",
            ));
        }
        if !channel.allows_user(self.user()) {
            return Err(CommandError::permission_denied(
                "channel is limited to another user",
            ));
        }
        Ok((channel, options))
    }

    /// Whether the connection token lets this client use `channel`: with a `grants`
    /// claim only the channels it matches (private ones included); without, every
    /// channel of a namespace that is not private.
    fn token_allows(&self, channel: &ChannelName, options: &NamespaceOptions) -> bool {
        match self.identity.as_ref().and_then(|i| i.grants.as_ref()) {
            Some(grants) => grants.allows(channel.as_str()),
            None => !options.private,
        }
    }

    fn connect(&mut self, connect: Connect) -> Result<Body, CommandError> {
        if self.connected {
            return Err(CommandError::bad_request("already connected"));
        }
        CommandError::check_len("name", &connect.name, bounds::CLIENT_LABEL)?;
        CommandError::check_len("version", &connect.version, bounds::CLIENT_LABEL)?;
        self.connected = true;
        self.name = connect.name;
        Ok(Body::Connect(self.connect_result(Vec::new())))
    }

    /// `connect` with a token: verified (which may fetch keys), then the identity is
    /// set or refreshed and the token's server-side subscriptions made.
    pub(super) async fn connect_with_token(
        &mut self,
        connect: Connect,
    ) -> Result<Body, CommandError> {
        // Any number of times: a refresh of the same user's token (checked below).
        CommandError::check_len("name", &connect.name, bounds::CLIENT_LABEL)?;
        CommandError::check_len("version", &connect.version, bounds::CLIENT_LABEL)?;
        // An anonymous connection becomes a user only before it subscribes (what it holds
        // was authorized as anonymous); a refresh of the same user may come any time,
        // after server-side subscriptions too.
        if self.identity.is_none() && !self.subscriptions.is_empty() {
            return Err(CommandError::bad_request(
                "connect with a token before subscribing",
            ));
        }
        let identity = match self.ctx.verifier.verify(&connect.token).await {
            Ok(identity) => identity,
            Err(AuthError::Invalid(reason)) => {
                return Err(CommandError::closing(
                    ErrorCode::Unauthorized,
                    reason,
                    CloseCode::TokenInvalid,
                ));
            }
            Err(AuthError::Expired) => {
                return Err(CommandError::closing(
                    ErrorCode::TokenExpired,
                    "token expired",
                    CloseCode::TokenExpired,
                ));
            }
        };
        let fresh = match &self.identity {
            // Authenticated at upgrade: `connect` may refresh the same user's token,
            // never switch the connection to another user.
            Some(held) if held.user != identity.user => {
                return Err(CommandError::permission_denied(
                    "this connection is authenticated as another user",
                ));
            }
            Some(_) => false,
            None => true,
        };
        if fresh {
            let Some(slot) = self.ctx.per_user.take(identity.user.clone()) else {
                metrics::rejected("per_user");
                return Err(CommandError::closing(
                    ErrorCode::LimitExceeded,
                    "too many connections for this user",
                    CloseCode::RateLimited,
                ));
            };
            self.user_slot = Some(Box::new(slot));
        }
        self.identity = Some(Box::new(identity));
        if fresh {
            self.ctx
                .hub
                .register(self.id, self.user().to_owned(), self.outbox.clone());
        }
        self.connected = true;
        if !connect.name.is_empty() {
            self.name = connect.name;
        }
        let subscriptions = self.server_side_subscribe().await?;
        Ok(Body::Connect(self.connect_result(subscriptions)))
    }

    /// Makes the session live: counts it against its user's limit, registers it with
    /// the hub, and makes the upgrade token's server-side subscriptions, announced in a
    /// `ConnectResult` push (id 0). `Some` refuses the session with that close code.
    pub(super) async fn start(&mut self) -> Option<CloseCode> {
        if let Some(user) = self.identity.as_ref().map(|i| i.user.clone()) {
            let Some(slot) = self.ctx.per_user.take(user) else {
                metrics::rejected("per_user");
                return Some(CloseCode::RateLimited);
            };
            self.user_slot = Some(Box::new(slot));
        }
        self.register();
        if self.identity.as_ref().is_none_or(|i| i.channels.is_empty()) {
            return None;
        }
        match self.server_side_subscribe().await {
            Ok(subscriptions) => {
                let result = self.connect_result(subscriptions);
                // Through the outbox, so the connection task writes it on its first turn.
                let frame = broker_proto::v1::ServerFrame {
                    id: 0,
                    error: None,
                    body: Some(Body::Connect(result)),
                };
                self.outbox
                    .push_reply(broker_proto::encode_frame(self.encoding, &frame));
                None
            }
            Err(e) => {
                tracing::info!(client = %self.client_id(), error = %e.message, "server-side subscriptions failed");
                let (error, close) = super::core::wire_error(e);
                self.push_frame(&broker_proto::v1::ServerFrame {
                    id: 0,
                    error: Some(error),
                    body: None,
                });
                close
            }
        }
    }

    pub(super) fn connect_result(&self, subscriptions: Vec<SubscribeResult>) -> ConnectResult {
        let config = &self.ctx.config;
        ConnectResult {
            client: self.client_id(),
            node: self.ctx.node_id.clone(),
            ping_interval_ms: u32::try_from(config.ping_interval.as_millis()).unwrap_or(u32::MAX),
            max_message_bytes: u32::try_from(config.max_message_bytes).unwrap_or(u32::MAX),
            subscriptions,
        }
    }

    /// Subscribes to the channels of the token's `channels` claim (those not yet
    /// subscribed). A channel the node does not know makes the token invalid (4001); a
    /// broker failure closes with 1013 so the client comes back later.
    pub(super) async fn server_side_subscribe(
        &mut self,
    ) -> Result<Vec<SubscribeResult>, CommandError> {
        let channels = self
            .identity
            .as_ref()
            .map(|i| i.channels.clone())
            .unwrap_or_default();
        let mut results = Vec::with_capacity(channels.len());
        for name in channels {
            if self.subscriptions.contains(&name) {
                continue;
            }
            let request = Subscribe {
                channel: name.clone(),
                ..Default::default()
            };
            match self.join(request, true).await {
                Ok(mut result) => {
                    result.channel = name;
                    results.push(result);
                }
                Err(e) => {
                    let close = if e.temporary() {
                        CloseCode::OverCapacity
                    } else {
                        CloseCode::TokenInvalid
                    };
                    return Err(CommandError::closing(
                        e.code,
                        format!("server-side subscription to {name}: {}", e.message),
                        close,
                    ));
                }
            }
        }
        Ok(results)
    }

    async fn subscribe(&mut self, request: Subscribe) -> Result<Body, CommandError> {
        let (channel, options) = self.authorize_user(&request.channel)?;
        let granted = if !request.token.is_empty() {
            let user = self.user().to_owned();
            match self
                .ctx
                .verifier
                .verify_subscription(&request.token, &user, channel.as_str())
                .await
            {
                Ok(_) => true,
                Err(AuthError::Invalid(reason)) => {
                    return Err(CommandError::new(
                        ErrorCode::Unauthorized,
                        format!("subscription {reason}"),
                    ));
                }
                Err(AuthError::Expired) => {
                    return Err(CommandError::new(
                        ErrorCode::TokenExpired,
                        "subscription token expired",
                    ));
                }
            }
        } else if self.token_allows(&channel, &options) {
            false
        } else {
            return Err(CommandError::permission_denied(
                "this channel needs a grant or a subscription token",
            ));
        };
        self.join(request, granted).await.map(Body::Subscribe)
    }

    /// Subscribes after the permission checks: the hub, the broker, the position (or
    /// recovery), presence.
    async fn join(
        &mut self,
        request: Subscribe,
        granted: bool,
    ) -> Result<SubscribeResult, CommandError> {
        let (channel, options) = self.ctx.channels.resolve(&request.channel)?;
        if !channel.allows_user(self.user()) {
            return Err(CommandError::permission_denied(
                "channel is limited to another user",
            ));
        }
        if self.subscriptions.contains(channel.as_str()) {
            return Err(CommandError::new(
                ErrorCode::AlreadySubscribed,
                "already subscribed",
            ));
        }
        if self.subscriptions.len() >= self.ctx.config.max_channels_per_connection {
            return Err(CommandError::new(
                ErrorCode::LimitExceeded,
                "too many channels on this connection",
            ));
        }
        let generation = self.subscriptions.next_generation();
        let ctx = self.ctx.clone();
        // Join the live stream first, then read history: publications arriving meanwhile
        // wait in the outbox, and the delivery rule skips the ones the reply returns.
        // There is no instant at which a publication is in neither set.
        let subscriber = Subscriber {
            session: self.id,
            encoding: self.encoding,
            generation,
            outbox: self.outbox.clone(),
        };
        ctx.hub.subscribe(channel.shared(), subscriber);
        // Kept by the subscription for its life: the hub's copy of the name, not ours.
        let channel = match ctx.hub.shared_name(channel.as_str()) {
            Some(shared) => channel.sharing(shared),
            None => channel,
        };
        // Resolves once the node's broker subscription delivers, so no session reads
        // history before live delivery is on.
        if let Err(e) = ctx.channels.subscribe(&channel).await {
            ctx.hub.unsubscribe(channel.as_str(), self.id);
            return Err(e);
        }
        let (result, last_offset, permit) = match self.position(&channel, &options, &request).await
        {
            Ok(r) => r,
            Err(e) => {
                self.undo_subscribe(&channel).await;
                return Err(e);
            }
        };
        if options.presence
            && let Err(e) = ctx
                .channels
                .broker()
                .presence_update(
                    &channel,
                    self.info(),
                    PresenceChange::Join,
                    options.join_leave,
                )
                .await
        {
            metrics::broker_error("presence");
            self.undo_subscribe(&channel).await;
            return Err(e.into());
        }
        self.subscriptions.insert(Subscription {
            channel,
            generation,
            epoch: result.epoch.clone(),
            last_offset,
            presence: options.presence,
            join_leave: options.join_leave,
            granted,
            seen: None,
            write_delay_ms: options.write_delay_ms,
        });
        self.permits.extend(permit);
        Ok(result)
    }

    /// The subscribe reply, and the offset the client has once it holds the reply.
    async fn position(
        &self,
        channel: &ChannelName,
        options: &NamespaceOptions,
        request: &Subscribe,
    ) -> Result<(SubscribeResult, u64, Option<ReadPermit>), CommandError> {
        let channels = &self.ctx.channels;
        if !options.has_history() {
            return Ok((SubscribeResult::default(), 0, None));
        }
        if !request.recover {
            let p = channels.position(channel).await?;
            let result = SubscribeResult {
                epoch: p.epoch,
                offset: p.offset,
                recoverable: true,
                ..Default::default()
            };
            return Ok((result, p.offset, None));
        }
        let (page, permit) = channels
            .history(channel, options, request.offset, Limit::All)
            .await?;
        let recovered = page.position.epoch == request.epoch && page.recovers(request.offset);
        metrics::recovery(recovered);
        let position = page.position.offset;
        let result = SubscribeResult {
            channel: String::new(),
            epoch: page.position.epoch,
            offset: position,
            recoverable: true,
            recovered,
            publications: if recovered {
                page.publications
            } else {
                Vec::new()
            },
        };
        Ok((result, position, Some(permit)))
    }

    async fn undo_subscribe(&self, channel: &ChannelName) {
        self.ctx.hub.unsubscribe(channel.as_str(), self.id);
        self.ctx.channels.broker().unsubscribe(channel).await;
    }

    /// Leaves one channel: the hub, the broker, presence.
    pub(super) async fn leave(&self, sub: Subscription) {
        self.undo_subscribe(&sub.channel).await;
        if sub.presence {
            let change = PresenceChange::Leave;
            if let Err(e) = self
                .ctx
                .channels
                .broker()
                .presence_update(&sub.channel, self.info(), change, sub.join_leave)
                .await
            {
                metrics::broker_error("presence");
                tracing::warn!(channel = %sub.channel, error = %e, "presence leave failed");
            }
        }
    }

    async fn unsubscribe(&mut self, request: Unsubscribe) -> Result<Body, CommandError> {
        if let Some(sub) = self.subscriptions.remove(&request.channel) {
            self.leave(sub).await;
        }
        Ok(Body::Unsubscribe(UnsubscribeResult {}))
    }

    /// Publishes; where the broker takes the publication's place in order at once, the
    /// answer comes off this task (see `pipeline.rs`) and the next command runs meanwhile.
    async fn publish(&mut self, id: u32, request: Publish) -> Result<Option<Body>, CommandError> {
        let (channel, options) = self.authorize_publish(&request.channel)?;
        let bytes = request.data.len();
        let publish = PublishRequest {
            data: request.data,
            content_type: request.content_type,
            idempotency_key: request.idempotency_key,
            info: Some(self.info()),
            blobs: request.blobs,
        };
        let channels = &self.ctx.channels;
        let pending =
            match channels.start_publish(&channel, &options, publish, Publisher::Client)? {
                Started::Pending(pending) => pending,
                Started::InPlace(publish) => {
                    let position = channels
                        .publish(&channel, &options, publish, Publisher::Client)
                        .await?;
                    return Ok(Some(published(position)));
                }
            };
        let pipeline = self.pipeline.get_or_insert_with(Default::default);
        // Counted with what a queued publication holds besides its data (its encoded
        // frame's head, client info, key names).
        let Some(slot) = pipeline.take(bytes + super::pipeline::OVERHEAD_BYTES) else {
            // Over the bound: this one is answered in place (it is in order already).
            return Ok(Some(published(pending.await?)));
        };
        let (outbox, encoding) = (self.outbox.clone(), self.encoding);
        tokio::spawn(async move {
            let answer = match pending.await {
                Ok(position) => super::media::frame(id, published(position)),
                Err(e) => super::media::error_frame(id, e),
            };
            if id > 0 {
                outbox.push_reply(broker_proto::encode_frame(encoding, &answer));
            }
            // The reply is queued before the next command may run.
            drop(slot);
        });
        Ok(None)
    }

    async fn presence(&mut self, request: PresenceRequest) -> Result<Body, CommandError> {
        let (channel, options) = self.authorize(&request.channel)?;
        let (clients, truncated) = self.ctx.channels.presence(&channel, &options).await?;
        Ok(Body::Presence(PresenceResult { clients, truncated }))
    }

    async fn history(&mut self, request: HistoryRequest) -> Result<Body, CommandError> {
        let (channel, options) = self.authorize(&request.channel)?;
        let (page, permit) = self
            .ctx
            .channels
            .history(
                &channel,
                &options,
                request.since_offset,
                Limit::Page(request.limit),
            )
            .await?;
        self.permits.push(permit);
        Ok(Body::History(HistoryResult {
            epoch: page.position.epoch,
            offset: page.position.offset,
            publications: page.publications,
        }))
    }
}

fn published(position: crate::broker::Position) -> Body {
    Body::Publish(PublishResult {
        offset: position.offset,
        epoch: position.epoch,
    })
}
