// An operator's calls to an installation of several concentrators: each
// terminal host is attached to one of them at a time, so the terminals are
// the union of what each lists, and closing batches means asking each. One
// concentrator down does not stop the others' answers; it is reported.

import { ClientError, Status, type Client } from "nice-grpc";
import type { DeadlineOptions } from "nice-grpc-client-middleware-deadline";
import type {
  CloseBatchesRequest,
  CloseBatchesResponse,
  ListTerminalsResponse,
  TerminalConcentratorServiceDefinition,
} from "../../gen/netpurse/terminal/v1/terminal.js";

type ConcentratorClient = Client<typeof TerminalConcentratorServiceDefinition, DeadlineOptions>;

/** One concentrator of the list, by its address. */
export interface AtConcentrator {
  address: string;
  client: ConcentratorClient;
}

/** A concentrator that did not answer, and why. */
export interface Unanswered {
  address: string;
  error: string;
}

const describe = (e: unknown) => (e instanceof ClientError ? `${Status[e.code]}: ${e.details}` : (e as Error).message);

/** ListTerminals at every concentrator: each one's answer, and those that did not answer; throws when none did. */
export async function listAtEvery(
  at: AtConcentrator[],
  options: DeadlineOptions = {},
): Promise<{ lists: { address: string; list: ListTerminalsResponse }[]; unanswered: Unanswered[] }> {
  const settled = await Promise.allSettled(at.map((c) => c.client.listTerminals({}, options)));
  const lists: { address: string; list: ListTerminalsResponse }[] = [];
  const unanswered: Unanswered[] = [];
  settled.forEach((r, i) => {
    const address = at[i]!.address;
    if (r.status === "fulfilled") lists.push({ address, list: r.value });
    else unanswered.push({ address, error: describe(r.reason) });
  });
  if (lists.length === 0) throw (settled[0] as PromiseRejectedResult).reason;
  return { lists, unanswered };
}

/**
 * CloseBatches at every concentrator: the batches each closed, together. A
 * terminal host (or PSAM) asked for is attached at one concentrator only, so
 * NOT_FOUND from the others is expected; it is an error only when every
 * concentrator answers it. Any other error (a concentrator down, say) is
 * reported in `unanswered`, and thrown when no concentrator answered.
 */
export async function closeBatchesAtEvery(
  at: AtConcentrator[],
  request: CloseBatchesRequest,
  options: DeadlineOptions = {},
): Promise<{ response: CloseBatchesResponse; unanswered: Unanswered[] }> {
  const settled = await Promise.allSettled(at.map((c) => c.client.closeBatches(request, options)));
  const response: CloseBatchesResponse = { closed: [], notClosed: [] };
  const unanswered: Unanswered[] = [];
  let answered = 0;
  let notFound: unknown;
  settled.forEach((r, i) => {
    if (r.status === "fulfilled") {
      answered++;
      response.closed.push(...r.value.closed);
      response.notClosed.push(...r.value.notClosed);
    } else if (r.reason instanceof ClientError && r.reason.code === Status.NOT_FOUND) {
      notFound = r.reason;
    } else {
      unanswered.push({ address: at[i]!.address, error: describe(r.reason) });
    }
  });
  if (answered === 0 && unanswered.length === 0) throw notFound;
  if (answered === 0 && notFound === undefined) throw (settled[0] as PromiseRejectedResult).reason;
  return { response, unanswered };
}
