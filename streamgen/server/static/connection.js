// The socket to /v1/ws (docs/protocol.md). It reopens by itself after any
// close, backing off from half a second to eight. Browsers cannot set headers
// on a WebSocket handshake, so an API key travels as the subprotocol
// `bearer.KEY`.

const FIRST_RETRY_MS = 500;
const LAST_RETRY_MS = 8000;

export class Connection {
  #url;
  #onMessage;
  #onState;
  #apiKey = "";
  #socket = null;
  #retryMs = FIRST_RETRY_MS;

  /** onMessage(message); onState(kind, text) with kind "connecting", "open" or "closed". */
  constructor(url, { onMessage, onState }) {
    this.#url = url;
    this.#onMessage = onMessage;
    this.#onState = onState;
  }

  open(apiKey) {
    this.#apiKey = apiKey;
    this.#connect();
  }

  /** Close the socket so that the next one is opened with this key. */
  reopen(apiKey) {
    this.#apiKey = apiKey;
    this.#socket.close();
  }

  get isOpen() {
    return this.#socket !== null && this.#socket.readyState === WebSocket.OPEN;
  }

  /** Send one message; false when the socket is not open. */
  send(message) {
    if (!this.isOpen) return false;
    this.#socket.send(JSON.stringify(message));
    return true;
  }

  #connect() {
    this.#onState("connecting", "connecting");
    const protocols = ["streamgen.v1", ...(this.#apiKey ? [`bearer.${this.#apiKey}`] : [])];
    const socket = new WebSocket(this.#url, protocols);
    this.#socket = socket;
    let opened = false;  // a refused handshake closes without ever opening
    socket.onopen = () => {
      opened = true;
      this.#retryMs = FIRST_RETRY_MS;
      this.#onState("open", "connected");
    };
    socket.onmessage = (ev) => this.#onMessage(JSON.parse(ev.data));
    socket.onclose = () => {
      const why = opened ? "disconnected" : "refused (API key or origin?)";
      this.#onState("closed", `${why}, retrying in ${(this.#retryMs / 1000).toFixed(1)} s`);
      setTimeout(() => this.#connect(), this.#retryMs);
      this.#retryMs = Math.min(this.#retryMs * 2, LAST_RETRY_MS);
    };
  }
}
