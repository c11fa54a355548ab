// The inbound server class: smtp-server with our replies (CatalogueSMTPServer) and the fast path for
// un-dot-stuffing DATA (src/message/dot-stuffing.ts) on every connection it makes.
import type { Socket } from 'node:net';
import { fastDataConnection } from '../message/dot-stuffing';
import { CatalogueSMTPServer } from './replies';

export class FastDataSMTPServer extends CatalogueSMTPServer {
  override connect(socket: Socket, socketOptions?: Parameters<CatalogueSMTPServer['connect']>[1]): void {
    super.connect(socket, socketOptions);
    // connect() registered the connection last; a Set keeps insertion order.
    let connection: unknown;
    for (const c of this.connections) connection = c;
    fastDataConnection(connection);
  }
}
