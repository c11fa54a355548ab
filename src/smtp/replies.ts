// smtp-server adds an enhanced status code to every reply, chosen from the reply code alone, so a 451
// would always read 4.3.0. Our catalogue picks the enhanced code per error (451 4.4.1 for downstreams
// that are down) and puts it at the front of the text. CatalogueSMTPServer keeps ours instead of adding
// a second one, on its own connections only: other smtp-server instances in the process (the test
// downstreams, say) are untouched. tests/replies.test.ts fails loudly if an smtp-server upgrade breaks this.
import { SMTPServer, type SMTPServerOptions } from 'smtp-server';
import type { SMTPConnection } from 'smtp-server/lib/smtp-connection';

const ENHANCED_PREFIX = /^[245]\.\d{1,3}\.\d{1,3} /;

type Send = (code: number, data?: unknown, context?: unknown) => void;

/** Makes one connection send a reply whose text starts with an enhanced code as it is (context false = none added). */
function keepOwnEnhancedCode(connection: SMTPConnection): void {
  const target = connection as unknown as { send: Send };
  const send = target.send;
  target.send = function (this: unknown, code: number, data?: unknown, context?: unknown) {
    return send.call(this, code, data, typeof data === 'string' && ENHANCED_PREFIX.test(data) ? false : context);
  };
}

/**
 * The server's set of open connections (`connections`, public in smtp-server's types) is where every
 * new connection is registered before it sends anything beyond its greeting: the one place per server
 * to see each connection as it is made.
 */
class Connections extends Set<SMTPConnection> {
  override add(connection: SMTPConnection): this {
    if (!this.has(connection)) keepOwnEnhancedCode(connection);
    return super.add(connection);
  }
}

/** An SMTPServer whose replies keep an enhanced status code given at the front of their text. */
export class CatalogueSMTPServer extends SMTPServer {
  constructor(options: SMTPServerOptions) {
    super(options);
    this.connections = new Connections();
  }
}
