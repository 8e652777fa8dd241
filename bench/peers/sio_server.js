// The socket.io peer of bench/peers/run.py: rooms, and a broadcast to the rest of the room.
//
// A client connects with `?room=NAME` and joins that room; every "m" event it emits is sent
// to every other socket of the room (`socket.to(room).emit`, which encodes the packet once
// and writes it to each socket). WebSocket transport only (the bench's clients skip the
// HTTP long-polling upgrade dance), no compression (syncd declines permessage-deflate too),
// socket.io's in-memory adapter: one process, nothing stored.
//
// Run: node sio_server.js [PORT]   (0 or nothing: any free port). Prints {"port": N} once
// listening; exits on SIGTERM.
"use strict";

const http = require("http");
const { Server } = require("socket.io");

const port = parseInt(process.argv[2] || "0", 10);
const httpServer = http.createServer();
const io = new Server(httpServer, {
  transports: ["websocket"],
  serveClient: false,
  perMessageDeflate: false,
});

io.on("connection", (socket) => {
  const room = String(socket.handshake.query.room || "room");
  socket.join(room);
  socket.on("m", (data) => {
    socket.to(room).emit("m", data);
  });
});

httpServer.listen(port, "127.0.0.1", () => {
  process.stdout.write(JSON.stringify({ port: httpServer.address().port }) + "\n");
});

process.on("SIGTERM", () => {
  io.close();
  process.exit(0);
});
