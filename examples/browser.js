// A minimal browser client. Paste it into the developer console of a page the relay serves
// (same origin), with a token minted on your server (pgws-relay token --mode rw --channel
// chat): never put the JWT secret in a browser. For a complete page (reconnects, rate,
// sending) use the console: PGWS_ROOT_PATH=$(python -m relay.console) pgws-relay, then open
// http://HOST:3000/ (docs/console.md).
const token = "PASTE.A.TOKEN";
const channel = "chat";
const scheme = location.protocol === "https:" ? "wss" : "ws";
const ws = new WebSocket(`${scheme}://${location.host}/${channel}/${token}`);
ws.onopen = () => ws.send("hello from a browser");            // needs mode w or rw
ws.onmessage = (event) => console.log(channel, event.data);   // the NOTIFY payload, verbatim
ws.onclose = (event) => console.log("closed", event.code, event.reason); // 3001: JWT expired
