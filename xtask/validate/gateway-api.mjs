// Validates the Gateway API objects (HTTPRoute, GRPCRoute) in the YAML files named on the
// command line against the Gateway API CRDs' schemas (npm @kubernetes-models/gateway-api,
// generated from them). Other kinds are left to kubernetes-validate. One line per object;
// exits 1 when any object fails.
import { readFileSync } from "node:fs";
import { parseAllDocuments } from "yaml";
import { HTTPRoute } from "@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1/HTTPRoute";
import { GRPCRoute } from "@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1/GRPCRoute";

const kinds = { HTTPRoute, GRPCRoute };
let failed = 0;
for (const file of process.argv.slice(2)) {
  for (const doc of parseAllDocuments(readFileSync(file, "utf8"))) {
    const object = doc.toJS();
    if (!object || object.apiVersion !== "gateway.networking.k8s.io/v1") continue;
    const name = `${object.kind}/${object.metadata?.namespace}/${object.metadata?.name}`;
    const Model = kinds[object.kind];
    if (!Model) {
      console.log(`FAIL ${file} ${name}: no schema for this kind here`);
      failed++;
      continue;
    }
    try {
      new Model(object).validate();
      console.log(`PASS ${file} ${name}`);
    } catch (error) {
      console.log(`FAIL ${file} ${name}: ${error.message}`);
      failed++;
    }
  }
}
process.exit(failed ? 1 : 0);
