//! The commands of `ClientFrame`, each turned into a reply body or a [`CommandError`]
//! with the documented code.

use super::{CommandError, Session, Subscription};
use crate::{
    auth::AuthError,
    broker::{PresenceChange, PublishRequest},
    channel::ChannelName,
    config::NamespaceOptions,
    hub::Subscriber,
    metrics,
};
use broker_proto::{
    CloseCode, ErrorCode,
    v1::{
        ClientFrame, Connect, ConnectResult, HistoryRequest, HistoryResult, PresenceRequest,
        PresenceResult, Publish, PublishResult, Subscribe, SubscribeResult, Unsubscribe,
        UnsubscribeResult, client_frame::Command, server_frame::Body,
    },
};
use std::time::Instant;

impl Session {
    /// Runs one command and queues its reply; `Some` asks to close the connection.
    pub(super) async fn handle(&mut self, frame: ClientFrame) -> Option<CloseCode> {
        let id = frame.id;
        let Some(command) = frame.command else {
            metrics::command("unknown");
            return self.reply(
                id,
                Err(CommandError::new(
                    ErrorCode::BadRequest,
                    "frame carries no known command",
                )),
            );
        };
        if !self.bucket.take(Instant::now()) {
            self.strikes += 1;
            if self.strikes >= self.node.config.limits.rate_limit_strikes {
                return Some(CloseCode::RateLimited);
            }
            return self.reply(
                id,
                Err(CommandError::new(
                    ErrorCode::TooManyRequests,
                    "command rate limit exceeded",
                )),
            );
        }
        self.strikes = 0;
        let result = match command {
            Command::Connect(c) => {
                metrics::command("connect");
                self.connect(c)
            }
            Command::Subscribe(s) => {
                metrics::command("subscribe");
                self.subscribe(s).await
            }
            Command::Unsubscribe(u) => {
                metrics::command("unsubscribe");
                self.unsubscribe(u).await
            }
            Command::Publish(p) => {
                metrics::command("publish");
                self.publish(p).await
            }
            Command::Presence(p) => {
                metrics::command("presence");
                self.presence(p).await
            }
            Command::History(h) => {
                metrics::command("history");
                self.history(h).await
            }
            Command::Ping(_) => {
                metrics::command("ping");
                Ok(Body::Pong(Default::default()))
            }
        };
        self.reply(id, result)
    }

    /// Validates a channel name and checks that this client may use it.
    fn authorize(&self, name: &str) -> Result<(ChannelName, NamespaceOptions), CommandError> {
        let (channel, options) = self.node.channel(name)?;
        if self.node.verifier.enabled() && self.identity.is_none() && !options.allow_anonymous {
            return Err(CommandError::new(
                ErrorCode::Unauthorized,
                "this namespace needs a token",
            ));
        }
        if !channel.allows_user(self.user()) {
            return Err(CommandError::new(
                ErrorCode::PermissionDenied,
                "channel is limited to another user",
            ));
        }
        Ok((channel, options))
    }

    fn connect(&mut self, connect: Connect) -> Result<Body, CommandError> {
        if self.connected {
            return Err(CommandError::new(
                ErrorCode::BadRequest,
                "already connected",
            ));
        }
        if !connect.token.is_empty() && self.node.verifier.enabled() {
            if !self.subscriptions.is_empty() {
                return Err(CommandError::new(
                    ErrorCode::BadRequest,
                    "connect with a token before subscribing",
                ));
            }
            match self.node.verifier.verify(&connect.token) {
                Ok(identity) => {
                    self.identity = Some(identity);
                    self.node
                        .register(self.id, self.user().to_owned(), self.outbox.clone());
                }
                Err(AuthError::Invalid(reason)) => {
                    return Err(CommandError {
                        code: ErrorCode::Unauthorized,
                        message: reason,
                        close: Some(CloseCode::TokenInvalid),
                    });
                }
                Err(AuthError::Expired) => {
                    return Err(CommandError {
                        code: ErrorCode::TokenExpired,
                        message: "token expired".into(),
                        close: Some(CloseCode::TokenExpired),
                    });
                }
            }
        }
        self.connected = true;
        let config = &self.node.config;
        Ok(Body::Connect(ConnectResult {
            client: self.client.clone(),
            node: config.node_id.clone(),
            ping_interval_ms: u32::try_from(config.limits.ping_interval_ms).unwrap_or(u32::MAX),
            max_message_bytes: u32::try_from(config.limits.max_message_bytes).unwrap_or(u32::MAX),
        }))
    }

    async fn subscribe(&mut self, request: Subscribe) -> Result<Body, CommandError> {
        let (channel, options) = self.authorize(&request.channel)?;
        if self.subscriptions.contains_key(channel.as_str()) {
            return Err(CommandError::new(
                ErrorCode::AlreadySubscribed,
                "already subscribed",
            ));
        }
        if self.subscriptions.len() >= self.node.config.limits.max_channels_per_connection {
            return Err(CommandError::new(
                ErrorCode::LimitExceeded,
                "too many channels on this connection",
            ));
        }
        let key = channel.shared().clone();
        let node = self.node.clone();
        // Join the live stream first, then read history: publications arriving meanwhile
        // wait in the outbox, and the drain skips the ones recovery already returned.
        // There is no instant at which a publication is in neither set.
        let sub = Subscriber {
            session: self.id,
            encoding: self.encoding,
            outbox: self.outbox.clone(),
        };
        node.hub.subscribe(&key, sub);
        // Every subscribe waits until the node's broker subscription is live (the broker
        // counts references), so no session reads history before live delivery is on.
        if let Err(e) = node.broker.subscribe(&channel).await {
            node.hub.unsubscribe(&key, self.id);
            metrics::broker_error("subscribe");
            return Err(CommandError::new(e.code(), e.to_string()));
        }
        let result = if !options.has_history() {
            Ok(SubscribeResult::default())
        } else if request.recover {
            node.broker
                .history(&channel, &options, request.offset, 0)
                .await
                .map(|page| {
                    let recovered = page.complete && page.position.epoch == request.epoch;
                    metrics::recovery(recovered);
                    SubscribeResult {
                        epoch: page.position.epoch,
                        offset: page.position.offset,
                        recoverable: true,
                        recovered,
                        publications: if recovered {
                            page.publications
                        } else {
                            Vec::new()
                        },
                    }
                })
        } else {
            node.broker
                .position(&channel)
                .await
                .map(|p| SubscribeResult {
                    epoch: p.epoch,
                    offset: p.offset,
                    recoverable: true,
                    ..Default::default()
                })
        };
        let result = match result {
            Ok(r) => r,
            Err(e) => {
                self.undo_subscribe(&key, &channel).await;
                metrics::broker_error("history");
                return Err(CommandError::new(e.code(), e.to_string()));
            }
        };
        if options.presence {
            let change = PresenceChange::Join;
            if let Err(e) = node
                .broker
                .presence_update(&channel, self.info(), change, options.join_leave)
                .await
            {
                self.undo_subscribe(&key, &channel).await;
                metrics::broker_error("presence");
                return Err(CommandError::new(e.code(), e.to_string()));
            }
        }
        let subscription = Subscription {
            channel,
            last_offset: result.offset,
            presence: options.presence,
            join_leave: options.join_leave,
        };
        self.subscriptions.insert(key, subscription);
        Ok(Body::Subscribe(result))
    }

    async fn undo_subscribe(&self, key: &std::sync::Arc<str>, channel: &ChannelName) {
        self.node.hub.unsubscribe(key, self.id);
        self.node.broker.unsubscribe(channel).await;
    }

    async fn unsubscribe(&mut self, request: Unsubscribe) -> Result<Body, CommandError> {
        if let Some((key, sub)) = self.subscriptions.remove_entry(request.channel.as_str()) {
            self.leave(&key, &sub).await;
        }
        Ok(Body::Unsubscribe(UnsubscribeResult {}))
    }

    async fn publish(&mut self, request: Publish) -> Result<Body, CommandError> {
        let (channel, options) = self.authorize(&request.channel)?;
        if !options.allow_publish {
            return Err(CommandError::new(
                ErrorCode::PermissionDenied,
                "clients may not publish in this namespace",
            ));
        }
        let publish = PublishRequest {
            data: request.data,
            content_type: request.content_type,
            idempotency_key: request.idempotency_key,
            info: Some(self.info()),
        };
        let position = self
            .node
            .publish(&channel, &options, publish, "client")
            .await?;
        Ok(Body::Publish(PublishResult {
            offset: position.offset,
            epoch: position.epoch,
        }))
    }

    async fn presence(&mut self, request: PresenceRequest) -> Result<Body, CommandError> {
        let (channel, options) = self.authorize(&request.channel)?;
        if !options.presence {
            return Err(CommandError::new(
                ErrorCode::PermissionDenied,
                "presence is disabled in this namespace",
            ));
        }
        let clients = self.node.broker.presence(&channel).await.map_err(|e| {
            metrics::broker_error("presence");
            CommandError::new(e.code(), e.to_string())
        })?;
        Ok(Body::Presence(PresenceResult { clients }))
    }

    async fn history(&mut self, request: HistoryRequest) -> Result<Body, CommandError> {
        let (channel, options) = self.authorize(&request.channel)?;
        let page = self
            .node
            .history(&channel, &options, request.since_offset, request.limit)
            .await?;
        Ok(Body::History(HistoryResult {
            epoch: page.position.epoch,
            offset: page.position.offset,
            publications: page.publications,
        }))
    }
}
