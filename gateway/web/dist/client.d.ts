interface Backoff {
	/** The cap of the first attempt, in ms. */
	minMs: number;
	/** The largest cap, in ms. */
	maxMs: number;
}
declare enum WireType {
	/**
	 * Used for int32, int64, uint32, uint64, sint32, sint64, bool, enum
	 */
	Varint = 0,
	/**
	 * Used for fixed64, sfixed64, double.
	 * Always 8 bytes with little-endian byte order.
	 */
	Bit64 = 1,
	/**
	 * Used for string, bytes, embedded messages, packed repeated fields
	 *
	 * Only repeated numeric types (types which use the varint, 32-bit,
	 * or 64-bit wire types) can be packed. In proto3, such fields are
	 * packed by default.
	 */
	LengthDelimited = 2,
	/**
	 * Start of a tag-delimited aggregate, such as a proto2 group, or a message
	 * in editions with message_encoding = DELIMITED.
	 */
	StartGroup = 3,
	/**
	 * End of a tag-delimited aggregate.
	 */
	EndGroup = 4,
	/**
	 * Used for fixed32, sfixed32, float.
	 * Always 4 bytes with little-endian byte order.
	 */
	Bit32 = 5
}
type Message<TypeName extends string = string> = {
	/**
	 * The fully qualified Protobuf type-name of the message.
	 */
	readonly $typeName: TypeName;
	/**
	 * Unknown fields and extensions stored on the message.
	 */
	$unknown?: UnknownField[] | undefined;
};
type UnknownField = {
	readonly no: number;
	readonly wireType: WireType;
	readonly data: Uint8Array;
};
type ClientFrame = Message<"gateway.v1.ClientFrame"> & {
	/**
	 * >0 when a reply is wanted; the reply carries the same id
	 *
	 * @generated from field: uint32 id = 1;
	 */
	id: number;
	/**
	 * @generated from oneof gateway.v1.ClientFrame.command
	 */
	command: {
		/**
		 * optional first frame: token when not given at upgrade
		 *
		 * @generated from field: gateway.v1.Connect connect = 2;
		 */
		value: Connect;
		case: "connect";
	} | {
		/**
		 * @generated from field: gateway.v1.Subscribe subscribe = 3;
		 */
		value: Subscribe;
		case: "subscribe";
	} | {
		/**
		 * @generated from field: gateway.v1.Unsubscribe unsubscribe = 4;
		 */
		value: Unsubscribe;
		case: "unsubscribe";
	} | {
		/**
		 * @generated from field: gateway.v1.Publish publish = 5;
		 */
		value: Publish;
		case: "publish";
	} | {
		/**
		 * @generated from field: gateway.v1.PresenceRequest presence = 6;
		 */
		value: PresenceRequest;
		case: "presence";
	} | {
		/**
		 * @generated from field: gateway.v1.HistoryRequest history = 7;
		 */
		value: HistoryRequest;
		case: "history";
	} | {
		/**
		 * @generated from field: gateway.v1.Ping ping = 8;
		 */
		value: Ping;
		case: "ping";
	} | {
		/**
		 * one chunk of an image upload
		 *
		 * @generated from field: gateway.v1.BlobPut blob_put = 9;
		 */
		value: BlobPut;
		case: "blobPut";
	} | {
		/**
		 * fetch a stored image; reply: BlobChunk frames, same id
		 *
		 * @generated from field: gateway.v1.BlobGet blob_get = 10;
		 */
		value: BlobGet;
		case: "blobGet";
	} | {
		/**
		 * ask the backend (rpc.url); reply: RpcResult
		 *
		 * @generated from field: gateway.v1.Rpc rpc = 11;
		 */
		value: Rpc;
		case: "rpc";
	} | {
		case: undefined;
		value?: undefined;
	};
};
type Connect = Message<"gateway.v1.Connect"> & {
	/**
	 * @generated from field: string token = 1;
	 */
	token: string;
	/**
	 * @generated from field: string name = 2;
	 */
	name: string;
	/**
	 * @generated from field: string version = 3;
	 */
	version: string;
};
type Subscribe = Message<"gateway.v1.Subscribe"> & {
	/**
	 * @generated from field: string channel = 1;
	 */
	channel: string;
	/**
	 * @generated from field: bool recover = 2;
	 */
	recover: boolean;
	/**
	 * @generated from field: uint64 offset = 3;
	 */
	offset: bigint;
	/**
	 * @generated from field: string epoch = 4;
	 */
	epoch: string;
	/**
	 * @generated from field: string token = 5;
	 */
	token: string;
};
type Unsubscribe = Message<"gateway.v1.Unsubscribe"> & {
	/**
	 * @generated from field: string channel = 1;
	 */
	channel: string;
};
type Publish = Message<"gateway.v1.Publish"> & {
	/**
	 * @generated from field: string channel = 1;
	 */
	channel: string;
	/**
	 * @generated from field: bytes data = 2;
	 */
	data: Uint8Array;
	/**
	 * @generated from field: string content_type = 3;
	 */
	contentType: string;
	/**
	 * @generated from field: string idempotency_key = 4;
	 */
	idempotencyKey: string;
	/**
	 * @generated from field: repeated gateway.v1.BlobRef blobs = 5;
	 */
	blobs: BlobRef[];
};
type PresenceRequest = Message<"gateway.v1.PresenceRequest"> & {
	/**
	 * @generated from field: string channel = 1;
	 */
	channel: string;
};
type HistoryRequest = Message<"gateway.v1.HistoryRequest"> & {
	/**
	 * @generated from field: string channel = 1;
	 */
	channel: string;
	/**
	 * @generated from field: uint64 since_offset = 2;
	 */
	sinceOffset: bigint;
	/**
	 * @generated from field: uint32 limit = 3;
	 */
	limit: number;
};
type Ping = Message<"gateway.v1.Ping"> & {};
type ServerFrame = Message<"gateway.v1.ServerFrame"> & {
	/**
	 * the request id for replies, 0 for pushes
	 *
	 * @generated from field: uint32 id = 1;
	 */
	id: number;
	/**
	 * set when the command failed; the body is then empty
	 *
	 * @generated from field: gateway.v1.Error error = 2;
	 */
	error?: Error$1 | undefined;
	/**
	 * @generated from oneof gateway.v1.ServerFrame.body
	 */
	body: {
		/**
		 * @generated from field: gateway.v1.ConnectResult connect = 3;
		 */
		value: ConnectResult;
		case: "connect";
	} | {
		/**
		 * @generated from field: gateway.v1.SubscribeResult subscribe = 4;
		 */
		value: SubscribeResult;
		case: "subscribe";
	} | {
		/**
		 * @generated from field: gateway.v1.UnsubscribeResult unsubscribe = 5;
		 */
		value: UnsubscribeResult;
		case: "unsubscribe";
	} | {
		/**
		 * @generated from field: gateway.v1.PublishResult publish = 6;
		 */
		value: PublishResult;
		case: "publish";
	} | {
		/**
		 * @generated from field: gateway.v1.PresenceResult presence = 7;
		 */
		value: PresenceResult;
		case: "presence";
	} | {
		/**
		 * @generated from field: gateway.v1.HistoryResult history = 8;
		 */
		value: HistoryResult;
		case: "history";
	} | {
		/**
		 * @generated from field: gateway.v1.Pong pong = 9;
		 */
		value: Pong;
		case: "pong";
	} | {
		/**
		 * push: a message on a subscribed channel
		 *
		 * @generated from field: gateway.v1.Publication publication = 10;
		 */
		value: Publication;
		case: "publication";
	} | {
		/**
		 * push: presence change
		 *
		 * @generated from field: gateway.v1.Join join = 11;
		 */
		value: Join;
		case: "join";
	} | {
		/**
		 * @generated from field: gateway.v1.Leave leave = 12;
		 */
		value: Leave;
		case: "leave";
	} | {
		/**
		 * push: sent just before the server closes the socket
		 *
		 * @generated from field: gateway.v1.Disconnect disconnect = 13;
		 */
		value: Disconnect;
		case: "disconnect";
	} | {
		/**
		 * @generated from field: gateway.v1.BlobPutResult blob_put = 14;
		 */
		value: BlobPutResult;
		case: "blobPut";
	} | {
		/**
		 * @generated from field: gateway.v1.BlobChunk blob_chunk = 15;
		 */
		value: BlobChunk;
		case: "blobChunk";
	} | {
		/**
		 * @generated from field: gateway.v1.RpcResult rpc = 16;
		 */
		value: RpcResult;
		case: "rpc";
	} | {
		/**
		 * extension, push: the channel's stream has a new epoch
		 *
		 * @generated from field: gateway.v1.Reset reset = 17;
		 */
		value: Reset;
		case: "reset";
	} | {
		case: undefined;
		value?: undefined;
	};
};
type Error$1 = Message<"gateway.v1.Error"> & {
	/**
	 * @generated from field: uint32 code = 1;
	 */
	code: number;
	/**
	 * @generated from field: string message = 2;
	 */
	message: string;
	/**
	 * @generated from field: bool temporary = 3;
	 */
	temporary: boolean;
};
/**
 * `name` (extension): the display name the client gave in `Connect` (at most 64 bytes).
 *
 * @generated from message gateway.v1.ClientInfo
 */
export type ClientInfo = Message<"gateway.v1.ClientInfo"> & {
	/**
	 * @generated from field: string user = 1;
	 */
	user: string;
	/**
	 * @generated from field: string client = 2;
	 */
	client: string;
	/**
	 * @generated from field: string name = 3;
	 */
	name: string;
};
type ConnectResult = Message<"gateway.v1.ConnectResult"> & {
	/**
	 * @generated from field: string client = 1;
	 */
	client: string;
	/**
	 * @generated from field: string node = 2;
	 */
	node: string;
	/**
	 * @generated from field: uint32 ping_interval_ms = 3;
	 */
	pingIntervalMs: number;
	/**
	 * @generated from field: uint32 max_message_bytes = 4;
	 */
	maxMessageBytes: number;
	/**
	 * @generated from field: repeated gateway.v1.SubscribeResult subscriptions = 5;
	 */
	subscriptions: SubscribeResult[];
};
type SubscribeResult = Message<"gateway.v1.SubscribeResult"> & {
	/**
	 * @generated from field: string epoch = 1;
	 */
	epoch: string;
	/**
	 * @generated from field: uint64 offset = 2;
	 */
	offset: bigint;
	/**
	 * @generated from field: bool recoverable = 3;
	 */
	recoverable: boolean;
	/**
	 * @generated from field: bool recovered = 4;
	 */
	recovered: boolean;
	/**
	 * @generated from field: repeated gateway.v1.Publication publications = 5;
	 */
	publications: Publication[];
	/**
	 * @generated from field: string channel = 6;
	 */
	channel: string;
};
type UnsubscribeResult = Message<"gateway.v1.UnsubscribeResult"> & {};
type PublishResult = Message<"gateway.v1.PublishResult"> & {
	/**
	 * @generated from field: uint64 offset = 1;
	 */
	offset: bigint;
	/**
	 * @generated from field: string epoch = 2;
	 */
	epoch: string;
};
type PresenceResult = Message<"gateway.v1.PresenceResult"> & {
	/**
	 * @generated from field: repeated gateway.v1.ClientInfo clients = 1;
	 */
	clients: ClientInfo[];
	/**
	 * @generated from field: bool truncated = 2;
	 */
	truncated: boolean;
};
type HistoryResult = Message<"gateway.v1.HistoryResult"> & {
	/**
	 * @generated from field: string epoch = 1;
	 */
	epoch: string;
	/**
	 * @generated from field: uint64 offset = 2;
	 */
	offset: bigint;
	/**
	 * @generated from field: repeated gateway.v1.Publication publications = 3;
	 */
	publications: Publication[];
};
type Pong = Message<"gateway.v1.Pong"> & {};
/**
 * @generated from message gateway.v1.Publication
 */
export type Publication = Message<"gateway.v1.Publication"> & {
	/**
	 * @generated from field: string channel = 1;
	 */
	channel: string;
	/**
	 * @generated from field: uint64 offset = 2;
	 */
	offset: bigint;
	/**
	 * @generated from field: string epoch = 3;
	 */
	epoch: string;
	/**
	 * @generated from field: bytes data = 4;
	 */
	data: Uint8Array;
	/**
	 * @generated from field: string content_type = 5;
	 */
	contentType: string;
	/**
	 * @generated from field: gateway.v1.ClientInfo info = 6;
	 */
	info?: ClientInfo | undefined;
	/**
	 * @generated from field: int64 time_unix_ms = 7;
	 */
	timeUnixMs: bigint;
	/**
	 * @generated from field: repeated gateway.v1.BlobRef blobs = 8;
	 */
	blobs: BlobRef[];
};
type Join = Message<"gateway.v1.Join"> & {
	/**
	 * @generated from field: string channel = 1;
	 */
	channel: string;
	/**
	 * @generated from field: gateway.v1.ClientInfo info = 2;
	 */
	info?: ClientInfo | undefined;
};
type Leave = Message<"gateway.v1.Leave"> & {
	/**
	 * @generated from field: string channel = 1;
	 */
	channel: string;
	/**
	 * @generated from field: gateway.v1.ClientInfo info = 2;
	 */
	info?: ClientInfo | undefined;
};
type Disconnect = Message<"gateway.v1.Disconnect"> & {
	/**
	 * @generated from field: uint32 code = 1;
	 */
	code: number;
	/**
	 * @generated from field: string reason = 2;
	 */
	reason: string;
	/**
	 * @generated from field: bool reconnect = 3;
	 */
	reconnect: boolean;
};
type Reset = Message<"gateway.v1.Reset"> & {
	/**
	 * @generated from field: string channel = 1;
	 */
	channel: string;
	/**
	 * @generated from field: string epoch = 2;
	 */
	epoch: string;
};
type BlobPut = Message<"gateway.v1.BlobPut"> & {
	/**
	 * client-chosen number naming the upload on this connection
	 *
	 * @generated from field: uint32 upload = 1;
	 */
	upload: number;
	/**
	 * first chunk: where it will be published (its permissions apply)
	 *
	 * @generated from field: string channel = 2;
	 */
	channel: string;
	/**
	 * first chunk: claimed type; the server sniffs the bytes
	 *
	 * @generated from field: string content_type = 3;
	 */
	contentType: string;
	/**
	 * first chunk: total bytes
	 *
	 * @generated from field: uint64 size = 4;
	 */
	size: bigint;
	/**
	 * this chunk's bytes
	 *
	 * @generated from field: bytes data = 5;
	 */
	data: Uint8Array;
	/**
	 * final chunk; its reply (same id) carries BlobPutResult
	 *
	 * @generated from field: bool last = 6;
	 */
	last: boolean;
	/**
	 * first chunk, optional: SHA-256 of the whole blob; if the
	 *
	 * @generated from field: string id = 7;
	 */
	id: string;
};
type BlobGet = Message<"gateway.v1.BlobGet"> & {
	/**
	 * @generated from field: string id = 1;
	 */
	id: string;
	/**
	 * @generated from field: string channel = 2;
	 */
	channel: string;
};
type Rpc = Message<"gateway.v1.Rpc"> & {
	/**
	 * @generated from field: string method = 1;
	 */
	method: string;
	/**
	 * @generated from field: bytes data = 2;
	 */
	data: Uint8Array;
	/**
	 * @generated from field: string content_type = 3;
	 */
	contentType: string;
};
/**
 * @generated from message gateway.v1.BlobRef
 */
export type BlobRef = Message<"gateway.v1.BlobRef"> & {
	/**
	 * @generated from field: string id = 1;
	 */
	id: string;
	/**
	 * @generated from field: uint64 size = 2;
	 */
	size: bigint;
	/**
	 * @generated from field: string content_type = 3;
	 */
	contentType: string;
	/**
	 * set by the server: signed, expiring GET URL (path + query)
	 *
	 * @generated from field: string url = 4;
	 */
	url: string;
	/**
	 * @generated from field: string name = 5;
	 */
	name: string;
	/**
	 * @generated from field: uint32 width = 6;
	 */
	width: number;
	/**
	 * @generated from field: uint32 height = 7;
	 */
	height: number;
};
type BlobPutResult = Message<"gateway.v1.BlobPutResult"> & {
	/**
	 * @generated from field: gateway.v1.BlobRef blob = 1;
	 */
	blob?: BlobRef | undefined;
};
type BlobChunk = Message<"gateway.v1.BlobChunk"> & {
	/**
	 * @generated from field: string id = 1;
	 */
	id: string;
	/**
	 * @generated from field: uint64 offset = 2;
	 */
	offset: bigint;
	/**
	 * @generated from field: bytes data = 3;
	 */
	data: Uint8Array;
	/**
	 * @generated from field: bool last = 4;
	 */
	last: boolean;
	/**
	 * @generated from field: uint64 size = 5;
	 */
	size: bigint;
	/**
	 * @generated from field: string content_type = 6;
	 */
	contentType: string;
};
type RpcResult = Message<"gateway.v1.RpcResult"> & {
	/**
	 * @generated from field: bytes data = 1;
	 */
	data: Uint8Array;
	/**
	 * @generated from field: string content_type = 2;
	 */
	contentType: string;
};
export interface Codec {
	/** The WebSocket subprotocol that selects this encoding. */
	subprotocol: string;
	encode(frames: ClientFrame[]): Uint8Array | string;
	decode(data: ArrayBuffer | string): ServerFrame[];
}
export declare const protoCodec: Codec;
declare class Emitter<Events extends object> {
	#private;
	on<K extends keyof Events>(event: K, handler: (value: Events[K]) => void): () => void;
	off<K extends keyof Events>(event: K, handler: (value: Events[K]) => void): void;
	protected emit<K extends keyof Events>(event: K, value: Events[K]): void;
}
/** At most one call in flight and one waiting: a newer request replaces the waiting one
 * (which resolves `undefined`), so a fast slider never queues stale work. */
export declare class Latest<I, O> {
	#private;
	constructor(call: (input: I) => Promise<O>);
	/** Calls now, or after the call in flight; `undefined` when a newer request came. */
	run(input: I): Promise<O | undefined>;
	/** Calls in flight or waiting (at most 2). */
	get pending(): number;
}
export type State = "connecting" | "connected" | "disconnected" | "closed";
export interface ClientOptions {
	/** A token (JWT) for the first connection. */
	token?: string;
	/** Called for a token before connecting, and again when it expired (close 4003,
	 * error 109). */
	getToken?: () => Promise<string>;
	/** Display name, shown to others in presence, Join and Leave. */
	name?: string;
	/** Wire encoding: binary by default; `jsonCodec` from `./json` for text frames. */
	codec?: Codec;
	/** Reconnect delays (full jitter). */
	backoff?: Backoff;
	/** The client pings when it heard nothing for this long (ms)... */
	pingIntervalMs?: number;
	/** ...and drops the connection as dead when nothing answers within this (ms). */
	pingTimeoutMs?: number;
	/** How long a command waits for its reply (ms). */
	requestTimeoutMs?: number;
	/** A WebSocket implementation (for Node); the browser's by default. */
	WebSocket?: typeof WebSocket;
	/** Connect at once (default); otherwise call `connect()`. */
	autoConnect?: boolean;
}
export interface ClientEvents {
	state: State;
	connected: {
		client: string;
		node: string;
	};
	disconnected: {
		code: number;
		reason: string;
		reconnectInMs: number | null;
	};
	error: GatewayError;
}
export interface SubscriptionEvents {
	publication: Publication;
	join: ClientInfo;
	leave: ClientInfo;
	/** Live, after the first subscribe or a resubscribe (`recovered`: nothing was missed). */
	subscribed: {
		epoch: string;
		offset: bigint;
		recovered: boolean;
		resubscribed: boolean;
	};
	/** The stream restarted or what was missed could not be recovered: reload state. */
	reset: {
		reason: "epoch" | "recovery-failed";
		epoch: string;
	};
	error: GatewayError;
}
export interface SubscribeOptions {
	/** Deliver up to this many recent publications first (history on join). */
	history?: number;
	/** Resume from a position saved earlier (recovering what came after it). */
	since?: {
		epoch: string;
		offset: bigint;
	};
	/**
	 * Subscription token for a channel of a private namespace (a JWT from your backend
	 * with `sub` and `channel`). A function is asked again at every (re)subscribe, so a
	 * fresh token can be fetched.
	 */
	token?: string | (() => string | Promise<string>);
}
export interface PublishOptions {
	contentType?: string;
	/** Stored blobs to attach (ids or refs from `uploadBlob`). */
	blobs?: (string | BlobRef)[];
	/** Chosen automatically; the same key makes a retry a no-op on the server. */
	idempotencyKey?: string;
	/** Give up retrying after this long (ms). */
	timeoutMs?: number;
}
export interface UploadOptions {
	/** The claimed type; the server checks the bytes. Default: the File's type. */
	contentType?: string;
	/** Progress: bytes acknowledged of the total. */
	onProgress?: (sent: number, total: number) => void;
	/** Chunk size (bytes). */
	chunkBytes?: number;
}
export interface RpcAnswer {
	data: Uint8Array;
	contentType: string;
}
/** An error reply (`code` from DESIGN.md), or 0 for "the connection dropped". */
export declare class GatewayError extends Error {
	readonly code: number;
	readonly temporary: boolean;
	constructor(code: number, message: string, temporary: boolean);
}
export declare function sha256Hex(bytes: Uint8Array): Promise<string>;
export declare class Client extends Emitter<ClientEvents> {
	#private;
	readonly url: string;
	/** The session: client id and node (once connected). */
	session: {
		client: string;
		node: string;
	} | undefined;
	constructor(url: string, options?: ClientOptions);
	get state(): State;
	/** Starts connecting (again, after `close`). */
	connect(): void;
	/** Closes for good: no reconnect; commands in flight fail. */
	close(): void;
	subscribe(channel: string, options?: SubscribeOptions): Subscription;
	/** Publishes; retried with the same idempotency key on temporary failures and across
	 * reconnects, so it is delivered once. */
	publish(channel: string, data: Uint8Array | string, options?: PublishOptions): Promise<{
		offset: bigint;
		epoch: string;
	}>;
	presence(channel: string): Promise<ClientInfo[]>;
	/** Publications after `since` (up to `limit`), with the channel's current position. */
	history(channel: string, options?: {
		since?: bigint;
		limit?: number;
	}): Promise<{
		publications: Publication[];
		offset: bigint;
		epoch: string;
	}>;
	/** Asks the backend (`POST {rpc.url}/{method}`); the answer comes back binary. */
	rpc(method: string, data?: Uint8Array | string, contentType?: string): Promise<RpcAnswer>;
	/** `rpc(method, …)` keeping at most one call in flight and one waiting: a newer call
	 * replaces the waiting one, which resolves `undefined`. */
	latest(method: string, contentType?: string): Latest<Uint8Array | string, RpcAnswer>;
	/** Uploads an image to `channel` (where it will be published); returns its stored
	 * reference. Hashed first: a blob the server already has for the channel is not sent
	 * again. Restarted from the beginning if the connection drops. */
	uploadBlob(channel: string, file: Blob | Uint8Array, options?: UploadOptions): Promise<BlobRef>;
	/** Downloads a blob over the WebSocket (usually an `<img src=blob.url>` is better: the
	 * browser caches it). */
	getBlob(id: string, channel: string): Promise<Uint8Array>;
}
interface Link {
	send(sub: Subscription): void;
	unsubscribe(sub: Subscription): void;
	resubscribe(sub: Subscription): void;
	history(since: bigint, limit: number): Promise<{
		publications: Publication[];
		epoch: string;
	}>;
}
/** A channel subscription: delivers each publication once, in order, across reconnects. */
export declare class Subscription extends Emitter<SubscriptionEvents> {
	#private;
	readonly channel: string;
	readonly client: Client;
	/** @internal Subscribe attempts that failed temporarily in a row. */
	retries: number;
	/** @internal Where the subscription token comes from, if any. */
	readonly tokenSource: SubscribeOptions["token"];
	constructor(client: Client, channel: string, options: SubscribeOptions, link: Link);
	/** Where the subscription is: save it to resume later (`subscribe(…, { since })`). */
	get position(): {
		epoch: string;
		offset: bigint;
	};
	unsubscribe(): void;
	/** @internal What to ask for when (re)subscribing. */
	recoverFrom(): {
		recover: boolean;
		offset: bigint;
		epoch: string;
	};
	/** @internal */
	subscribed(r: SubscribeResult): void;
	/** @internal */
	failed(e: GatewayError): void;
	/** @internal */
	publication(p: Publication): void;
	/** @internal */
	reset(epoch: string): void;
	/** @internal */
	presence(kind: "join" | "leave", info: ClientInfo | undefined): void;
	/** @internal */
	disconnected(): void;
}

export {};
